"""A real single-node Slurm cluster on this machine (munge, MariaDB + slurmdbd, slurmctld, slurmd),
for the launcher's integration tests and for trying ``ssl-container launch`` without a cluster.

    bash launch/local_slurm/cluster.sh start       # SLURM_BASE=/tmp/ssl-container-slurm by default
    export SLURM_CONF=/tmp/ssl-container-slurm/etc/slurm.conf
    ssl-container launch ... ; squeue ; sacct
    bash launch/local_slurm/cluster.sh stop

or from Python (what the tests do)::

    with LocalSlurm(tmp_path / "slurm") as cluster:   # free ports, its own state and database
        os.environ.update(cluster.client_env)
        ...

Needs root and Debian's packages: ``apt-get install -y --no-install-recommends slurmctld slurmd
slurm-client munge slurmdbd mariadb-server``.
"""
from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
from pathlib import Path

__all__ = ["SCRIPT", "REQUIRED_PROGRAMS", "APT_PACKAGES", "missing_requirements", "LocalSlurm"]

SCRIPT = Path(__file__).with_name("cluster.sh")
REQUIRED_PROGRAMS = ("munged", "mungekey", "slurmctld", "slurmd", "slurmdbd", "mariadbd", "mariadb-install-db",
                     "sbatch", "srun", "sacct", "scontrol", "squeue")
APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge", "slurmdbd", "mariadb-server")


def missing_requirements() -> str | None:
    """Why a local cluster cannot start here, or None."""
    search = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    missing = [p for p in REQUIRED_PROGRAMS if shutil.which(p, path=search) is None]
    if missing:
        return (f"Slurm packages not installed (missing {', '.join(missing)}); install with: apt-get install -y "
                f"--no-install-recommends {' '.join(APT_PACKAGES)}")
    if os.geteuid() != 0:
        return "the local Slurm cluster runs its daemons as root"
    return None


def _ports_free(*ports: int) -> bool:
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _pick_ports() -> tuple[int, int]:
    """slurmctld / slurmd / slurmdbd on base..base+2, MariaDB on base+3; below the 20000-32000 range
    jobs derive their rendezvous ports from (ssl_container.distributed.rendezvous_port)."""
    rng = random.Random(os.getpid())
    for _ in range(200):
        base = rng.randrange(12000, 19000)
        if _ports_free(base, base + 1, base + 2, base + 3):
            return base, base + 3
    raise RuntimeError("no free ports for a local Slurm cluster")


class LocalSlurm:
    """Start / stop one local cluster under ``base`` (see the module doc)."""

    def __init__(self, base: str | Path, port: int | None = None, db_port: int | None = None,
                 accounting: bool = True) -> None:
        self.base = Path(base).resolve()
        if port is None or db_port is None:
            picked = _pick_ports()
            port, db_port = port or picked[0], db_port or picked[1]
        self.port, self.db_port, self.accounting = port, db_port, accounting
        self.started = False

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def client_env(self) -> dict[str, str]:
        """What a client (sbatch, sacct, submitit) needs."""
        return {"SLURM_CONF": str(self.conf)}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(SLURM_BASE=str(self.base), SLURM_PORT=str(self.port), SLURM_DB_PORT=str(self.db_port),
                   SLURM_ACCOUNTING="1" if self.accounting else "0", SLURM_CONF=str(self.conf))
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        return env

    def _run(self, action: str, timeout: float) -> str:
        proc = subprocess.run(["bash", str(SCRIPT), action], env=self._env(), capture_output=True, text=True,
                              timeout=timeout)
        out = proc.stdout + proc.stderr
        if proc.returncode != 0:
            raise RuntimeError(f"cluster.sh {action} failed (exit {proc.returncode}):\n{out}")
        return out

    def start(self, timeout: float = 240) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        self.started = True  # even a half-started cluster must be stopped
        return self._run("start", timeout)

    def stop(self, timeout: float = 180) -> str:
        if not self.started:
            return ""
        out = self._run("stop", timeout)
        self.started = False
        return out

    def status(self) -> str:
        return self._run("status", 60)

    def logs(self, lines: int = 30) -> str:
        """The end of every daemon log, for test failure messages."""
        parts = []
        for path in sorted((self.base / "log").glob("*.log")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {path}\n" + "\n".join(text))
        return "\n".join(parts)

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
