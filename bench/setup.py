"""``python -m bench setup``: install the comparison peers outside the repository.

Nginx and its Lua module come from Debian; LiteLLM goes into its own venv
(~700 MB, never the project's); Portkey's gateway comes from npm with
``@hono/node-server`` pinned to 1.13.5 (streaming breaks with newer releases,
Portkey-AI/gateway#1389). With no flag, everything is installed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys

from bench.contenders import BENCH_VENVS, PORTKEY_DIR

PORTKEY_PACKAGE = {
    "name": "bench-portkey",
    "private": True,
    "dependencies": {"@portkey-ai/gateway": "1.15.2"},
    "overrides": {"@hono/node-server": "1.13.5"},
}


def commands(nginx: bool, litellm: bool, portkey: bool, bench_deps: bool) -> list[list[str] | str]:
    cmds: list[list[str] | str] = []
    if nginx:
        cmds += [
            ["apt-get", "update", "-q"],
            ["apt-get", "install", "-y", "-q", "nginx-light", "libnginx-mod-http-lua", "lua-cjson"],
        ]
    if litellm:
        venv = BENCH_VENVS / "litellm"
        cmds += [
            [sys.executable, "-m", "venv", str(venv)],
            [str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"],
        ]
    if portkey:
        cmds += [
            f"write {PORTKEY_DIR / 'package.json'}",
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(PORTKEY_DIR)],
        ]
    if bench_deps:
        cmds += [[sys.executable, "-m", "pip", "install", "-q", "matplotlib>=3.8", "py-spy"]]
    return cmds


def setup(nginx: bool, litellm: bool, portkey: bool, bench_deps: bool, dry_run: bool) -> int:
    if not (nginx or litellm or portkey or bench_deps):
        nginx = litellm = portkey = bench_deps = True
    rc = 0
    for cmd in commands(nginx, litellm, portkey, bench_deps):
        if isinstance(cmd, str):
            print(f"+ {cmd}", flush=True)
            if not dry_run:
                PORTKEY_DIR.mkdir(parents=True, exist_ok=True)
                (PORTKEY_DIR / "package.json").write_text(
                    json.dumps(PORTKEY_PACKAGE, indent=2) + "\n"
                )
            continue
        print("+ " + shlex.join(cmd), flush=True)
        if not dry_run:
            r = subprocess.run(cmd)
            if r.returncode != 0:
                print(
                    f"  failed with {r.returncode}; that contender will be reported missing",
                    flush=True,
                )
                rc = 1
    return rc
