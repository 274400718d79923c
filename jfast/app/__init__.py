"""The command line and what only it needs: typed configs, run folders, the fine-tune job, the report."""
