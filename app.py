"""Hugging Face Spaces entry point: the explorer app (`explorer/`).

    python app.py [--model DIR] [--index DIR[,DIR…]] [--host 127.0.0.1] [--port 7860]

The same as `attribution demo`; options and environment variables: `explorer/launch.py`.
"""

import sys

from explorer.launch import main

if __name__ == "__main__":
    sys.exit(main())
