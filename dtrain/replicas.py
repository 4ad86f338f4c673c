"""Replica groups on torchft: survivors keep training, a returning group heals from a live peer.

Each replica group is one torchrun job with FSDP2 inside it; across groups the
gradients are summed over the replicas in each step's quorum by torchft's
fault-tolerant all-reduce. torchft is imported only here, and only when
``--fault_tolerance.enable=true`` (docs/fault-tolerance.md).

Two things torchft does not do, and dtrain adds:

- every step is one global batch, dealt over the replicas in that step's quorum;
  a step torchft does not commit is dealt again over the next quorum, so no
  sample is lost or repeated (``ReplicaTrainer`` in dtrain/replica_trainer.py);
- the heal transport (``PeerStateTransport``) binds to the address the job uses
  and loads with ``torch.load(weights_only=True)``: bytes from the network
  never run code, unlike torchft's HTTP transport (``weights_only=False``).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed import ReduceOp

from .config import _convert
from .errors import ConfigError, DtrainError


@dataclass
class FaultTolerance:
    """Launch settings of a replica group, not of the run: they differ between the groups of
    one job, so they are neither stored in the run's config nor part of its fingerprint."""

    enable: bool = False
    replica_id: int = 0
    group_size: int = 1
    min_replicas: int = 1
    timeout: float = 10.0
    quorum_timeout: float = 30.0
    quorum_retries: int = 3

    HELP = {
        "enable": "train as one replica group of a torchft job (lighthouse from TORCHFT_LIGHTHOUSE)",
        "replica_id": "this replica group's id, 0 .. group_size-1",
        "group_size": "replica groups the job is planned with",
        "min_replicas": "fewest replica groups that may commit a step",
        "timeout": "seconds a cross-replica collective, commit or heal may take before the "
        "replicas that did not answer are dropped from the step",
        "quorum_timeout": "seconds to wait for a quorum (the lighthouse) before a retry",
        "quorum_retries": "quorum attempts after the first before this replica stops",
    }

    @classmethod
    def from_args(cls, args) -> FaultTolerance:
        values = {}
        for f in dataclasses.fields(cls):
            raw = getattr(args, f"fault_tolerance.{f.name}", None)
            if raw is None:
                continue
            kind = type(f.default)
            try:
                values[f.name] = _convert(kind, raw)  # as --section.key values are read
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"--fault_tolerance.{f.name}={raw!r} is not a {kind.__name__}") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if not self.enable:
            return
        if self.group_size < 1 or not 0 <= self.replica_id < self.group_size:
            raise ConfigError(
                f"--fault_tolerance.replica_id={self.replica_id} is outside 0.."
                f"{self.group_size - 1} (--fault_tolerance.group_size={self.group_size}); "
                "give each replica group its own id below group_size"
            )
        if not 1 <= self.min_replicas <= self.group_size:
            raise ConfigError(
                f"--fault_tolerance.min_replicas={self.min_replicas} must be 1.."
                f"{self.group_size} (the planned replica groups)"
            )
        if not (0 < self.timeout < math.inf and 0 < self.quorum_timeout < math.inf) or self.quorum_retries < 0:
            raise ConfigError(
                "--fault_tolerance.timeout and quorum_timeout must be positive and quorum_retries 0 or more"
            )
        if not os.environ.get("TORCHFT_LIGHTHOUSE"):
            raise ConfigError(
                "--fault_tolerance.enable=true needs TORCHFT_LIGHTHOUSE=http://HOST:PORT, the "
                "torchft lighthouse of the job (start one with launch/replicas.sh)"
            )
        try:
            import torchft  # noqa: F401
        except ImportError:
            raise ConfigError("--fault_tolerance.enable=true needs torchft: pip install -e '.[ft]'") from None

    @property
    def job_id(self) -> str:
        """The job, as the run directory's lease knows it: every replica group of one SLURM job,
        else of one lighthouse."""
        return f"torchft:{os.environ.get('SLURM_JOB_ID') or os.environ.get('TORCHFT_LIGHTHOUSE', '')}"


class ReplicaError(DtrainError):
    """This replica group cannot go on; started again, it heals or resumes from a checkpoint."""


class QuorumLost(ReplicaError):
    """The lighthouse did not answer: this replica cannot know who trains with it."""


def address_towards(url: str) -> str:
    """This host's address on the route to ``url``'s host (no packet is sent): the one address
    peers that reach the lighthouse can reach us on, rather than every interface."""
    host = urllib.parse.urlparse(url).hostname or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


class PeerStateTransport:
    """Serves this rank's training state to the same rank of a healing replica group, and
    fetches a peer's. torchft's ``CheckpointTransport`` interface; the state is plain tensors,
    numbers and strings, read back with ``weights_only=True``."""

    def __init__(self, host: str, timeout: timedelta):
        self._timeout = timeout.total_seconds()
        self._state: bytes | None = None
        self._step = -1
        self._allowed = False
        self._cond = threading.Condition()
        transport = self

        class Handler(BaseHTTPRequestHandler):
            timeout = transport._timeout

            def do_GET(self):
                transport._serve(self)

            def log_message(self, *args):  # no line per request on stderr
                pass

        server_class = type(
            "Server",
            (ThreadingHTTPServer,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET, "daemon_threads": True},
        )
        self._server = server_class((host, 0), Handler)
        self._host = host
        self._thread = threading.Thread(target=self._server.serve_forever, name="dtrain-heal-server", daemon=True)
        self._thread.start()

    def _serve(self, request: BaseHTTPRequestHandler) -> None:
        try:
            step = int(request.path.rstrip("/").rsplit("/", 1)[-1])
        except ValueError:
            request.send_error(400, "expected /state/STEP")
            return
        with self._cond:  # a healing peer may ask before this rank reached the quorum: wait for it
            if not self._cond.wait_for(lambda: self._allowed and self._step == step, self._timeout):
                request.send_error(409, f"serving step {self._step}, not {step}")
                return
            state = self._state
        request.send_response(200)
        request.send_header("Content-Type", "application/octet-stream")
        request.send_header("Content-Length", str(len(state)))
        request.end_headers()
        request.wfile.write(state)

    def metadata(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._server.server_address[1]}/state/"

    def send_checkpoint(self, dst_ranks, step: int, state_dict, timeout) -> None:
        """Serialise the state now, between steps: a heal that outlasts the step must still get
        this step's state, never tensors the optimizer has since changed in place."""
        buffer = io.BytesIO()
        torch.save(state_dict, buffer)
        with self._cond:
            self._state, self._step, self._allowed = buffer.getvalue(), step, True
            self._cond.notify_all()

    def disallow_checkpoint(self) -> None:
        """Called before the optimizer step: no new reader (one in flight reads its own bytes)."""
        with self._cond:
            self._allowed, self._state = False, None

    def recv_checkpoint(self, src_rank: int, metadata: str, step: int, timeout):
        with urllib.request.urlopen(f"{metadata}{step}", timeout=self._timeout) as response:
            data = response.read()
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")

    def shutdown(self, wait: bool = True) -> None:
        self._server.shutdown()
        self._server.server_close()


class ReplicaGroup:
    """This group's torchft manager: one quorum and one commit per step.

    The manager starts at the first quorum, not before: from its start it beats to the lighthouse,
    and a group that beats without joining (restoring a checkpoint, evaluating step 0) holds every
    quorum of a two-group job, since torchft's lighthouse wants more than half of the live groups."""

    def __init__(self, settings: FaultTolerance, device: torch.device, state_dict, load_state_dict):
        self.settings, self.device = settings, device
        self.state_dict, self.load_state_dict = state_dict, load_state_dict
        self.lighthouse, self.quorum_retries = os.environ["TORCHFT_LIGHTHOUSE"], settings.quorum_retries
        self.manager = None
        self._first_step = 0

    def _start_manager(self):
        import torchft

        # torchft warns at every quorum change that NCCL's flight recorder cannot be reset, also on
        # gloo where there is none: a line per failure that says nothing to a dtrain user.
        logging.getLogger("torchft.manager").addFilter(lambda record: "flight recorder" not in record.getMessage())

        settings = self.settings
        timeout = timedelta(seconds=settings.timeout)
        host = address_towards(self.lighthouse)
        pg = (
            torchft.ProcessGroupNCCL(timeout=timeout)
            if self.device.type == "cuda"
            else torchft.ProcessGroupGloo(timeout=timeout)
        )
        manager = torchft.Manager(
            pg=pg,
            load_state_dict=self.load_state_dict,
            state_dict=self.state_dict,
            min_replica_size=settings.min_replicas,
            use_async_quorum=False,  # heal before the forward pass: the step's deal needs the quorum
            timeout=timeout,
            quorum_timeout=timedelta(seconds=settings.quorum_timeout),
            connect_timeout=timedelta(seconds=settings.quorum_timeout),
            replica_id=f"dtrain_{settings.replica_id}",
            hostname=host,
            checkpoint_transport=PeerStateTransport(host, timeout),
            init_sync=False,  # every group builds the same weights from the same seed
            quorum_retries=settings.quorum_retries,
        )
        # Count from the step this group restored (a heal then compares it with the peers').
        manager.load_state_dict({"step": self._first_step, "batches_committed": 0})
        return manager

    def set_step(self, step: int) -> None:
        """The step this group restored, from which its quorums count."""
        self._first_step = step
        if self.manager is not None:
            self.manager.load_state_dict({"step": step, "batches_committed": 0})

    def start_step(self) -> tuple[int, int]:
        """Join this step's quorum (healing first if this group is behind): (our rank, replicas).

        A failed call is tried again here: torchft retries only its own call to the lighthouse, and
        only within the deadline of ours, which a frozen group passes while frozen."""
        for _ in range(self.quorum_retries + 1):
            try:
                if self.manager is None:
                    self.manager = self._start_manager()
                self.manager.start_quorum()
                break
            except DtrainError:  # a heal refused (another configuration or group size): its own line
                raise
            except Exception as failed:
                error = failed
                self.manager._quorum_future = None  # torchft would raise the failed call's error again
        else:  # the lighthouse is gone, or every retry timed out
            raise QuorumLost(
                f"the torchft lighthouse at {self.lighthouse} did not answer "
                f"({' '.join(str(error).split())[:120]}); this replica stopped without writing anything "
                "(the newest committed checkpoint is intact): start the lighthouse again, then the "
                "replica groups, which resume from that checkpoint"
            ) from None
        return self.manager.participating_rank() or 0, max(self.manager.num_participants(), 1)

    def sum_across(self, tensors: list[torch.Tensor]) -> None:
        """Sum the tensors over this step's replicas, in place, in one all-reduce of one flat
        buffer (a call per tensor cost more than the step's arithmetic on small models). An error
        only fails the commit."""
        flat = _flatten_dense_tensors(tensors)
        self.manager.allreduce(flat, reduce_op=ReduceOp.SUM).wait()
        for tensor, summed in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            tensor.copy_(summed)

    def commit(self) -> bool:
        return self.manager.should_commit()

    def close(self) -> None:
        if self.manager is not None:
            self.manager.shutdown(wait=False)
