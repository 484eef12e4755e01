"""The explorer: the top layer, what a person uses (the `attribution` command, the Gradio app,
reports).

Layers import one way: `attribution` (the library) ← `index` (the FAISS store) ← `explorer`;
`tests/test_layers.py` checks it. Modules:

    cli.py        the `attribution` command (train, sample, scores, index build, query, evaluate, serve, demo)
    launch.py     start the app: options, loading the model and indexes, serving
    ui.py         the Gradio Blocks page and its API endpoints
    render.py     what the page shows as text and images (thumbnails, captions, banner, CSS)
    service.py    the query service behind the page: Explorer, Query, Answer
    build_job.py  the background build of a missing default index
    exports.py    export files of one answer, and their housekeeping
    report.py     the payload of one attribution, its JSON/CSV and PNG report
"""

import os

# before Gradio or diffusers are imported anywhere below
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
