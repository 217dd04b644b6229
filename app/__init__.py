"""attnlab.app: where people meet attnlab — the `attnlab` CLI, the Dash dashboard, HTML reports."""
