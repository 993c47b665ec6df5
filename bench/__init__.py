"""The harness: measurement, result records, W&B logging, report and pick."""
