"""Tests-only Ray job scripts: a job entrypoint shaped like ``jobs/<verb>.py`` (``--config X key=value ...``).

``job_script(doc, body)`` returns the source of such a script: it parses ``--config`` and overrides
into ``cfg`` (a dict; overrides are top-level ``key=value``) and then runs ``body``, so a test can submit a real job that does exactly one thing.
"""

from __future__ import annotations

import textwrap

_PRELUDE = '''
import argparse
import yaml

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("overrides", nargs="*")
args = ap.parse_args()
cfg = yaml.safe_load(open(args.config))
for item in args.overrides:
    key, _, value = item.partition("=")
    cfg[key] = yaml.safe_load(value)
'''


def job_script(doc: str, body: str) -> str:
    """The script's source: its docstring, the config prelude, then ``body`` (dedented)."""
    return f'"""{doc}"""\n{_PRELUDE}\n{textwrap.dedent(body)}'
