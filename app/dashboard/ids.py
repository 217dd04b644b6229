"""Component ids of the dashboard, one constant each (callbacks and browser tests import them)."""

# inputs
MODEL = "model"
MODEL_MISSING = "model-missing"
TEXT = "text"
UPLOAD = "upload"
BOS = "bos"
LAYERS = "layers"
RUN = "run"
CANCEL = "cancel"
MESSAGE = "message"

# background job
JOB = "job"  # dcc.Store: id of the running job
POLL = "poll"  # dcc.Interval polling the job
PROGRESS = "progress"  # html.Progress
PROGRESS_TEXT = "progress-text"

# runs
RUNS = "runs"
REFRESH_RUNS = "refresh-runs"
CURRENT = "current"  # dcc.Store: name of the run shown
RUN_INFO = "run-info"

# head selection and views
LAYER = "layer"
HEAD = "head"
TOKEN_MODE = "token-mode"
TOKENS = "tokens"
HEATMAP = "heatmap"
SINK_MAP = "sink-map"
ENTROPY_MAP = "entropy-map"

# intervention
ABLATE_MODE = "ablate-mode"
ABLATE = "ablate"
NEXT_TOKENS = "next-tokens"
NEXT_BARS = "next-bars"

# a cheap round trip (server clock), used to show the server stays responsive during long jobs
PING = "ping"
PONG = "pong"

# analysis runs (retrieval, induction, thought anchors, ...): their per-head score tables
SCORE = "score"
SCORE_MAP = "score-map"
ANALYSIS = "analysis"  # dcc.Store: name of the analysis run shown
TA_RECEIVERS = "ta-receivers"  # thought anchors: receiver score per sentence
TA_SUPPRESSION = "ta-suppression"  # thought anchors: sentence x sentence suppression matrix
