"""The hub client, its models, the gate, the request budget and the poll scheduler."""
