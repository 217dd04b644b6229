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

# intervention (method, scope and strength; next-token table and the head's attention before/after)
METHOD = "method"
SCOPE = "scope"
STRENGTH = "strength"
STRENGTH_LABEL = "strength-label"
SPAN = "span"  # PASTA: the highlighted substring
APPLY = "apply"
EDIT_INFO = "edit-info"
EDIT_RESULTS = "edit-results"  # the table and graphs below (hidden until an intervention is applied)
NEXT_TOKENS = "next-tokens"
NEXT_TABLE = "next-token-table"
NEXT_BARS = "next-bars"
ATTN_BEFORE = "attn-before"
ATTN_AFTER = "attn-after"

# a cheap round trip (server clock), used to show the server stays responsive during long jobs
PING = "ping"
PONG = "pong"

# analysis runs (retrieval, induction, thought anchors, ...): launched as background jobs or opened
# as saved runs; their per-head score tables
LAUNCH_ANALYSIS = "launch-analysis"  # dropdown: which analysis to launch
ANALYSIS_PARAMS = "analysis-params"  # the launcher's form (pattern-matching ids below)
PARAM = "analysis-param"  # {"type": PARAM, "name": <parameter>}
RUN_ANALYSIS = "run-analysis"
SCORE = "score"
SCORE_MAP = "score-map"
ANALYSIS = "analysis"  # dcc.Store: name of the analysis run shown
TA_GRAPHS = "ta-graphs"  # the row holding the two thought-anchor graphs (hidden for other analyses)
TA_RECEIVERS = "ta-receivers"  # thought anchors: receiver score per sentence
TA_SUPPRESSION = "ta-suppression"  # thought anchors: sentence x sentence suppression matrix
HEAD_VIEW = "analysis-head-view"  # the clicked head's own view for the open analysis

# views (side-by-side head views, head gallery, click-a-token, colour scales)
# radio: linear / log / power, shared by the maps, the pattern, the gallery, the analysis head view and the
# intervention's before/after maps (their difference stays linear around 0)
COLOR_SCALE = "color-scale"
HEAD_VIEWS = "head-views"  # the maps | pattern | tokens grid (collapsed to a hint until a capture is open)
HEAD_HINT = "head-hint"  # the one-line hint shown instead of the head views
HEAD_GALLERY = "head-gallery"  # every head of the selected layer as a thumbnail; a click selects it
# The token view's spans are drawn in the browser (assets/tokens.js says why) from TOKEN_SPANS
TOKENS_MESSAGE = "tokens-message"  # why the token view is empty (no run, a bad choice, a statistic to capture)
TOKENS_TEXT = "tokens-text"  # the drawn spans (class "tok", data-position, title); Dash never sets its children
TOKEN_SPANS = "token-spans"  # dcc.Store: the spans' data, column-wise ({"position", "text", "title", "alpha", ...})
TOKENS_DRAWN = "tokens-drawn"  # dcc.Store: how many spans tokens.js drew (the clientside callback's output)
TOKEN_CLICK = "token-click"  # dcc.Store: {"position", "at"} of the last click on a token (set by tokens.js)
SELECTED_TOKEN = "selected-token"  # dcc.Store: the clicked token's position (None: the last token)
TOKEN_DETAIL = "token-detail"  # the clicked token's row (what it attends to) and column (what attends to it)
ANALYSIS_GRAPHS = "analysis-graphs"  # the score map and head view (collapsed to a hint until a run is open)
ANALYSIS_HINT = "analysis-hint"
# panels: analysis form errors, intervention extras, run comparison, report links
FORM_ERROR = "analysis-form-error"  # the launcher form's validation message
APPLY_STATUS = "apply-status"  # the intervention's loading indicator and its timing
ATTN_DIFF = "attn-diff"  # the selected head's attention after minus before
HEADS_MOVED = "heads-moved"  # the heads whose attention moved most (bar chart)
COMPARE_RUN = "compare-run"  # dropdown: the second run of a comparison
COMPARE_INFO = "compare-info"  # what differs between the two runs (a table)
COMPARE_MAPS = "compare-maps"  # the comparison's maps (difference, or side by side)
REPORT_LINK = "report-link"  # the open report run's HTML
# the server's jobs (every page shows them) and the page's state in its URL
JOB_LIST = "job-list"  # the recent jobs, with a link to each finished job's run
SHOWN_JOB = "shown-job"  # dcc.Store: what the page shows of the server's jobs (the running job's id, a signature)
URL = "url"  # dcc.Location: ?run=&layer=&head=&view=&compare=
URL_PENDING = "url-pending"  # dcc.Store: the URL's layer, head and view, applied once its run is open
URL_WRITTEN = "url-written"  # dcc.Store: the query string the page wrote itself (not read back as a link)
