"""A local Triton Inference Server for the model repository (`make triton`), from the `nvidia-pytriton`
wheel, which ships a real `tritonserver` with the Python backend. For tests and for trying the
repository on a machine without NVIDIA's container; production runs the container (README).

    python -m runtime.serving.triton_server --install              # once: unpack the server into .venv/tritonserver
    python -m runtime.serving.triton_server build/triton/repo      # serve a repository on 127.0.0.1 (Ctrl-C stops)

The Python backend's stub runs the model in this interpreter's environment (its bin/ goes first on
PATH). The stub in this wheel needs numpy 1.x there: with numpy 2 its output tensors arrive empty.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from runtime.ports import free_port

WHEEL = "nvidia-pytriton==0.7.0"
DEFAULT_HOME = Path(sys.prefix) / "tritonserver"


class ServerError(RuntimeError):
    pass


def server_dir(home: Path = DEFAULT_HOME) -> Path:
    return home / "pytriton" / "tritonserver"


def installed(home: Path = DEFAULT_HOME) -> bool:
    return (home / ".installed").is_file()


def install(home: Path = DEFAULT_HOME) -> Path:
    """Download the wheel (no dependencies: it pins numpy<2 and tritonclient, which the project
    manages) and unpack the server, its libraries and this Python's backend stub. Unpacked beside
    `home` and renamed into place, so an interrupted install leaves nothing half-written."""
    if installed(home):
        return home
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    home.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home.parent, prefix=".tritonserver-") as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(tmp / "wheel"), WHEEL],
                       check=True)
        wheel = next((tmp / "wheel").glob("*.whl"))
        out = tmp / "home"
        with zipfile.ZipFile(wheel) as z:
            for info in z.infolist():
                if info.filename.startswith(("pytriton/tritonserver/", "nvidia_pytriton.libs/")):
                    z.extract(info, out)
                    mode = info.external_attr >> 16
                    if mode:
                        os.chmod(out / info.filename, mode & 0o777)
        srv = out / "pytriton" / "tritonserver"
        stub = srv / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.is_file():
            raise ServerError(f"{WHEEL} has no Python backend stub for Python {py}")
        shutil.copy2(stub, srv / "backends" / "python" / stub.name)
        for f in [srv / "bin" / "tritonserver", srv / "backends" / "python" / stub.name]:
            f.chmod(0o755)
        (out / ".installed").write_text(WHEEL + "\n")
        if home.exists():
            shutil.rmtree(home)
        out.rename(home)
    return home


@dataclass
class LocalServer:
    """tritonserver on loopback serving `repo`; `with LocalServer(repo) as s:` waits until the
    server and its models are ready and stops it (and its backend stubs) on exit."""
    repo: Path
    home: Path = DEFAULT_HOME
    http_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    log: Path | None = None
    proc: subprocess.Popen | None = None

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        srv = server_dir(self.home)
        return [str(srv / "bin" / "tritonserver"), f"--model-repository={Path(self.repo).resolve()}",
                f"--backend-directory={srv / 'backends'}", "--http-address=127.0.0.1",
                f"--http-port={self.http_port}", "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--log-verbose=0"]

    def environment(self) -> dict:
        env = dict(os.environ)
        libs = [str(self.home / "nvidia_pytriton.libs"), str(server_dir(self.home) / "lib")]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        return env

    def start(self, timeout: float = 240.0) -> "LocalServer":
        if not installed(self.home):
            raise ServerError(f"no tritonserver in {self.home}: run `python -m runtime.serving.triton_server --install` "
                              "(`make triton-server` does)")
        out = open(self.log, "ab") if self.log else None
        self.proc = subprocess.Popen(self.command(), env=self.environment(), stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import tritonclient.http as http

        deadline = time.monotonic() + timeout
        client = http.InferenceServerClient(self.http_url)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"tritonserver exited with code {self.proc.returncode}"
                                  + (f"; its log: {self.log}" if self.log else ""))
            try:
                if client.is_server_ready():
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        self.stop()
        raise ServerError(f"tritonserver not ready after {timeout:.0f} s"
                          + (f"; its log: {self.log}" if self.log else ""))

    def stop(self, timeout: float = 60.0) -> None:
        """SIGINT (Triton unloads its models, which closes the engine), then SIGKILL to the whole
        process group if it does not finish."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "LocalServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.serving.triton_server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("repo", nargs="?", help="model repository (`make triton` writes one)")
    ap.add_argument("--install", action="store_true", help=f"download {WHEEL} and unpack its tritonserver")
    ap.add_argument("--home", type=Path, default=DEFAULT_HOME, help=f"where the server lives (default {DEFAULT_HOME})")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=8001)
    a = ap.parse_args(argv)
    if a.install:
        print(f"tritonserver in {install(a.home)}")
    if not a.repo:
        return 0 if a.install else ap.error("give a repository or --install")
    server = LocalServer(Path(a.repo), a.home, a.http_port, a.grpc_port)
    try:
        server.start()
        print(f"serving {a.repo}: HTTP {server.http_url}, gRPC {server.grpc_url} (Ctrl-C stops)", file=sys.stderr)
        server.proc.wait()
    except KeyboardInterrupt:
        pass
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
