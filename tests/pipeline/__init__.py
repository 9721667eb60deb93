"""The worker, the steps and the fault policy, in process."""
