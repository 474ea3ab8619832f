"""Start and stop SGLang servers for benchmarks (`bench --launch`), and print serve commands for a draft.

`sglang_argv` builds the `python -m sglang.launch_server ...` argument list for one server config
(`steps, topk, draft_tokens`; all zero = no speculation), `LaunchedServer` runs it in its own
process group (argv list, never a shell), streams its output to a log file, waits for `/health`
with a timeout and stops it with SIGTERM to the whole group, then SIGKILL after a grace period.
When the server dies while starting, the error shows the tail of its log, which is where SGLang
says why (out of memory, a draft whose shapes do not fit the target, a bad flag).

`serve_command` returns the exact shell command that serves a trained draft with SGLang or vLLM:
the "serve it" step of the README and the GUI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from ..targets import shipped_draft_dir
from .config import SpecConfig

# SGLang renamed --cuda-graph-max-bs to --cuda-graph-max-bs-decode (and -prefill) in 0.5.2x; the old
# name is then an ambiguous prefix and argparse refuses it, so the flag follows the installed version.
CUDA_GRAPH_FLAG_OLD = "--cuda-graph-max-bs"
CUDA_GRAPH_FLAG_NEW = "--cuda-graph-max-bs-decode"


class SGLangNotInstalled(RuntimeError):
    """`--launch` needs SGLang in this Python environment."""


class ServerStartError(RuntimeError):
    """The launched server died or never became healthy; the message holds its log tail."""


def sglang_installed() -> bool:
    return importlib.util.find_spec("sglang") is not None


def require_sglang(python: Optional[str] = None) -> None:
    if python and python != sys.executable:
        return  # another interpreter: it says for itself, through the log, whether it has sglang
    if not sglang_installed():
        raise SGLangNotInstalled(
            "--launch starts `python -m sglang.launch_server`, but sglang is not installed in this environment "
            f"({sys.executable}). Install it (`pip install \"sglang[all]\"`, needs a CUDA GPU) or start the server "
            "yourself and pass --server URL (see `serve_command` / the GUI's serve step for the flags).")


def cuda_graph_flag() -> str:
    """The cuda-graph batch-size flag the installed SGLang understands (old name when unknown)."""
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return CUDA_GRAPH_FLAG_OLD
    root = Path(list(spec.submodule_search_locations)[0]) / "srt"
    for f in (root / "arg_groups" / "fields" / "exec_.py", root / "server_args.py"):
        try:
            if "cuda_graph_max_bs_decode" in f.read_text(encoding="utf-8", errors="replace"):
                return CUDA_GRAPH_FLAG_NEW
        except OSError:
            continue
    return CUDA_GRAPH_FLAG_OLD


# Draft families SGLang serves, and the --speculative-algorithm each is served with. SGLang has no
# Medusa (its speculative algorithms are EAGLE / EAGLE3 / NEXTN / STANDALONE / NGRAM).
SGLANG_ALGORITHMS = {"eagle3": "EAGLE3"}
# What serves the families SGLang cannot, for the refusal message.
OTHER_SERVERS = {"medusa": "vLLM <= 0.32 (`vllm serve TARGET --speculative-config '{\"method\": \"medusa\", "
                           "\"model\": DRAFT, \"num_speculative_tokens\": K}'`; vLLM 0.33 removed Medusa)"}
FAMILY_TITLES = {"eagle3": "EAGLE3", "medusa": "Medusa"}


def draft_family_name(draft) -> Optional[str]:
    """The family of the draft at `draft` (serving export, checkpoint or run dir) by its config.json's
    `architectures`, through the registry; None when it cannot be read (the caller's loader says why)."""
    from ..models.registry import family_for
    from ..models.serving import locate_draft

    try:
        arch = locate_draft(draft).config.get("architectures")
    except (OSError, ValueError):
        return None
    fam = family_for(arch[0]) if isinstance(arch, list) and arch and isinstance(arch[0], str) else None
    return fam.name if fam is not None else None


def sglang_refusal(draft, family: Optional[str] = None) -> Optional[str]:
    """Why SGLang cannot serve this draft (a family it has no algorithm for), or None. Checked before a
    server starts, so a Medusa draft is refused up front instead of failing in SGLang's log."""
    name = family or (draft_family_name(draft) if draft else None)
    if name is None or name in SGLANG_ALGORITHMS:
        return None
    title = FAMILY_TITLES.get(name, name)
    other = OTHER_SERVERS.get(name)
    return (f"SGLang has no {title} support: the draft {draft} is a {title} draft, which SGLang cannot serve "
            f"(it serves {', '.join(FAMILY_TITLES.get(n, n) for n in SGLANG_ALGORITHMS)} drafts). Measure it "
            "in-process with `specforge-wb evaluate --draft ...` (the Benchmark tab's In-process mode: acceptance "
            "length, histogram and speedup in the same fields as EAGLE3)"
            + (f", or serve it with {other}" if other else "") + ".")


def check_spec_params(steps: int, topk: int, draft_tokens: int) -> None:
    """Raise ValueError for a server config SGLang would reject or silently change.

    The rules are `SpecConfig.parse`'s, one set for the server and the in-process decoder: SGLang ranks
    `topk + (steps-1)*topk^2` candidates and keeps `draft_tokens - 1` of them (`organize_draft_results`),
    and with topk 1 it resets draft_tokens to steps + 1 (so anything else is refused here)."""
    SpecConfig.parse(f"1,{steps},{topk},{draft_tokens}", where=f"speculative config steps={steps} topk={topk} "
                     f"draft_tokens={draft_tokens}:")


def sglang_argv(target: str, draft: Optional[str] = None, steps: int = 0, topk: int = 0, draft_tokens: int = 0,
                *, port: int = 30000, host: str = "127.0.0.1", tp: int = 1, cuda_graph_max_bs: Optional[int] = None,
                mem_fraction_static: Optional[float] = None, dtype: Optional[str] = None,
                extra_args: Sequence[str] = (), python: Optional[str] = None,
                graph_flag: Optional[str] = None) -> list[str]:
    """argv for `python -m sglang.launch_server` serving `target`, with EAGLE3 when steps > 0."""
    check_spec_params(steps, topk, draft_tokens)
    argv = [python or sys.executable, "-m", "sglang.launch_server", "--model-path", str(target),
            "--host", host, "--port", str(port)]
    if steps > 0:
        if not draft:
            raise ValueError(f"config steps={steps}: speculative decoding needs a draft model path")
        argv += ["--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", str(shipped_draft_dir(str(draft)) or draft),
                 "--speculative-num-steps", str(steps), "--speculative-eagle-topk", str(topk),
                 "--speculative-num-draft-tokens", str(draft_tokens)]
    if tp != 1:
        argv += ["--tp-size", str(tp)]
    if cuda_graph_max_bs is not None:
        argv += [graph_flag or cuda_graph_flag(), str(cuda_graph_max_bs)]
    if mem_fraction_static is not None:
        argv += ["--mem-fraction-static", f"{mem_fraction_static:g}"]
    if dtype:
        argv += ["--dtype", dtype]
    argv += list(extra_args)
    return argv


def serve_command(target: str, draft: str, steps: int = 3, topk: int = 1, draft_tokens: Optional[int] = None,
                  *, engine: str = "sglang", port: int = 30000, host: str = "0.0.0.0", tp: int = 1,
                  mem_fraction_static: Optional[float] = None, cuda_graph_max_bs: Optional[int] = None,
                  graph_flag: str = CUDA_GRAPH_FLAG_OLD, family: str = "eagle3") -> str:
    """The shell command that serves `target` with the draft `draft` of `family` (quoted for a POSIX shell).

    sglang: `python -m sglang.launch_server --model-path T --speculative-algorithm EAGLE3 ...`
            (`graph_flag`: pass `--cuda-graph-max-bs-decode` for SGLang >= 0.5.2x); EAGLE3 only.
    vllm:   `vllm serve T --speculative-config '{"method": "eagle3", "model": D, "num_speculative_tokens": S}'`
            (vLLM drafts a chain: topk and draft_tokens do not apply); a Medusa draft gets method
            "medusa" (vLLM <= 0.32) and S = heads used.
    """
    if draft_tokens is None:
        draft_tokens = steps + 1 if topk == 1 else steps * topk
    if engine == "sglang":
        why = sglang_refusal(draft, family)
        if why:
            raise ValueError(why)
        argv = sglang_argv(target, draft, steps, topk, draft_tokens, port=port, host=host, tp=tp,
                           cuda_graph_max_bs=cuda_graph_max_bs, mem_fraction_static=mem_fraction_static,
                           python="python", graph_flag=graph_flag)
        return shlex.join(argv)
    if engine == "vllm":
        if steps < 1:
            raise ValueError("vllm: num_speculative_tokens (steps) must be at least 1")
        spec = json.dumps({"method": family, "model": str(draft), "num_speculative_tokens": steps})
        argv = ["vllm", "serve", str(target), "--speculative-config", spec, "--host", host, "--port", str(port)]
        if tp != 1:
            argv += ["--tensor-parallel-size", str(tp)]
        if mem_fraction_static is not None:
            argv += ["--gpu-memory-utilization", f"{mem_fraction_static:g}"]
        return shlex.join(argv)
    raise ValueError(f"engine {engine!r}: expected sglang or vllm")


def _health_ok(url: str, timeout_s: float = 5.0) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"
    return "\n".join(data.splitlines()[-lines:]) or "(log is empty)"


class LaunchedServer:
    """A server process: `with LaunchedServer(argv, url, log) as s: ...` starts it, waits for health, stops it."""

    def __init__(self, argv: Sequence[str], url: str, log_path: str | Path, start_timeout_s: float = 900.0,
                 stop_timeout_s: float = 30.0, env: Optional[dict] = None, should_stop=None):
        self.argv = [str(a) for a in argv]
        self.url = url.rstrip("/")
        self.log_path = Path(log_path)
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.env = env
        self.should_stop = should_stop
        self.proc: Optional[subprocess.Popen] = None
        self._log = None

    def start(self) -> "LaunchedServer":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"$ {shlex.join(self.argv)}\n".encode())
        self._log.flush()
        try:
            # A new session: SIGTERM to the group reaches SGLang's scheduler / detokenizer children too.
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         env={**os.environ, **(self.env or {})})
        except OSError as e:
            self._log.close()
            raise ServerStartError(f"cannot start {self.argv[0]}: {e}") from None
        return self

    def wait_healthy(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerStartError(f"the server exited with code {rc} while starting; last lines of "
                                       f"{self.log_path}:\n{log_tail(self.log_path)}")
            if _health_ok(self.url):
                return
            if self.should_stop is not None and self.should_stop():
                self.stop()
                raise ServerStartError("cancelled while the server was starting")
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(f"the server was not healthy at {self.url}/health after "
                                       f"{self.start_timeout_s:g}s; last lines of {self.log_path}:\n"
                                       f"{log_tail(self.log_path)}")
            time.sleep(0.5)

    def stop(self) -> Optional[int]:
        """SIGTERM the process group, SIGKILL it after `stop_timeout_s`; returns the exit code."""
        if self.proc is None:
            return None
        rc = self.proc.poll()
        if rc is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                rc = self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                rc = self.proc.wait(10)
        else:
            # The leader is gone; children it left in the group must not hold the GPU.
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._log is not None and not self._log.closed:
            self._log.close()
        return rc

    def __enter__(self) -> "LaunchedServer":
        self.start()
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
