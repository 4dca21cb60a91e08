"""Data-parallel training over many processes with PyTorch's own engine: torchrun starts the processes, FSDP2
(`torch.distributed.fsdp.fully_shard`) shards the model per transformer block, `torch.distributed.checkpoint` (DCP)
writes and reads sharded checkpoints. One process without the launcher's environment is `Parallel()` (rank 0 of 1)
and every function here is then a no-op, so the single-process path is the plain one.

Data-parallel semantics (what makes N ranks x micro batch b equal one process with batch N*b):
- every rank plans the same epoch with batches of N*b rows (`data.batch_size`), and trains on its own rows of each
  (`shard_batch`): the global order and the resume position do not depend on the rank;
- the loss is divided by the supervised tokens of the whole window on all ranks (one all-reduce), and FSDP sums the
  gradients (divide factor 1) instead of averaging them, so the update is the one-process update;
- only rank 0 prints, logs and writes the files beside the shards.

Quantized bases (QLoRA): bitsandbytes' `Params4bit`/`Int8Params` carry their quantization state on the parameter
object (`quant_state`, `SCB`); FSDP would cut the packed bytes into flat shards and rebuild plain tensors, losing
that state. They are frozen, so they need no gradient sync: they stay whole on every rank (`ignored_params`), while
the rest of the block (norms, LoRA tensors, the unquantized embedding and head) is sharded as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from leantune.checkpoint.io import atomic_dir
from leantune.checkpoint.safe_pickle import dcp_load, load_dcp_metadata
from leantune.models.kinds import blocks
from leantune.train.preference import shard_pairs
from leantune.train.state import find_latest_checkpoint

T = TypeVar("T")
DCP_DIR = "dcp"
"""The sharded weights and optimizer state of a checkpoint written by several ranks (`torch.distributed.checkpoint`)."""
RANK_STATE_KEY = "ranks"
"""Key of training_state.pt holding every rank's RNG streams (a one-process file has none)."""
LAUNCH_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedJobError(RuntimeError):
    """A rank of a multi-process job ended abnormally; the launcher stopped the others (the message says which)."""


@dataclass
class FSDPArgs:
    """Settings of multi-process runs (--devices > 1 or a torchrun/cluster launch)."""

    cpu_offload: bool = False
    """Keep the sharded parameters, gradients and optimizer state in CPU memory (FSDP2 CPUOffloadPolicy); the
    optimizer step then runs on the CPU. Only meaningful on GPUs."""
    reshard_after_forward: bool = True
    """Free each block's gathered weights after its forward (ZeRO-3; less memory, one more all-gather in backward)."""
    timeout: float = 600.0
    """Seconds a collective may wait for the other ranks before failing (a rank that died or hangs ends the job)."""

    def __post_init__(self) -> None:
        if isinstance(self.timeout, bool) or not self.timeout > 0:
            raise ValueError(f"--fsdp.timeout must be > 0 seconds, got {self.timeout}")


@dataclass
class Parallel:
    """This process's place in the job: rank 0 of 1 unless started by torchrun or a cluster launcher."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- collectives (no-ops in one process) ---------------------------------------------------------------------
    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks, in float64 (token counts stay exact up to 2**53)."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run `fn` on rank 0 only; its result, or its error (same type and message), reaches every rank, so a
        check that fails on rank 0 (a taken --out_dir) stops all ranks instead of leaving them waiting."""
        if not self.enabled:
            return fn()
        result: tuple[str, Any] = ("ok", None)
        if self.is_main:
            try:
                result = ("ok", fn())
            except Exception as e:  # sent as (type, message): any exception may not pickle
                result = ("error", (type(e), str(e)))
        kind, value = self.broadcast(result)
        if kind == "ok":
            return value
        cls, message = value
        if self.is_main:
            raise cls(message)
        try:
            err = cls(message)
        except Exception:
            err = RuntimeError(message)
        raise err

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")


def launched() -> bool:
    """True when torchrun or a cluster launcher set this process's rank (RANK, WORLD_SIZE, LOCAL_RANK)."""
    return all(k in os.environ for k in LAUNCH_ENV)


def init_from_env(timeout_s: float = 600.0, devices: int = 1) -> Parallel:
    """This process's Parallel; with the launcher's variables and WORLD_SIZE > 1, join the process group: nccl on
    CUDA (one GPU per local rank), gloo on CPU; MASTER_ADDR/MASTER_PORT come from the launcher."""
    if not launched() or int(os.environ["WORLD_SIZE"]) == 1:
        return Parallel(device=torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if devices > 1 and devices != local_world:
        raise ValueError(f"--devices {devices} but the launcher started {local_world} process(es) on this node: "
                         "pass the launcher's count or leave --devices out")
    if torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise ValueError(f"local rank {local} has no GPU (this node has {torch.cuda.device_count()}): start at "
                             "most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
    return Parallel(rank=rank, world_size=world, local_rank=local, device=device)


def shutdown(parallel: Parallel) -> None:
    if parallel.enabled and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def quiet_unless_main(parallel: Parallel) -> Iterator[None]:
    """Ranks other than 0 print nothing to stdout (errors still reach stderr)."""
    if parallel.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


# ---- data: every rank its rows of the same global batch --------------------------------------------------------
def shard_batch(batch: dict, rank: int, world_size: int) -> dict:
    """Rows [rank*B/N, (rank+1)*B/N) of a global batch of B rows (B = N*b for every full batch), trailing columns
    that are padding in all of them dropped. A rank whose share is empty (a last batch with fewer rows than ranks)
    gets a copy of row 0 with every label ignored: it contributes no loss and no token, but runs the same forward
    and backward, so every rank takes part in the same collectives. Preference batches split by pairs."""
    if "pairs" in batch:
        return shard_pairs(batch, rank, world_size)
    B = batch["input_ids"].shape[0]
    lo, hi = rank * B // world_size, (rank + 1) * B // world_size
    empty = hi == lo
    rows = slice(0, 1) if empty else slice(lo, hi)
    out = {k: (v[rows] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == B else
               v[rows] if isinstance(v, list) and len(v) == B else v) for k, v in batch.items()}
    if empty:
        out["labels"] = torch.full_like(out["labels"], -100)
        if "attention_mask" in out:
            out["attention_mask"] = torch.zeros_like(out["attention_mask"])
        if "sample_ids" in out:
            out["sample_ids"] = [[]]
    elif "attention_mask" in out and "decoder_input_ids" not in out:  # decoder rows: real tokens first
        T = out["input_ids"].shape[1]
        keep = max(int(out["attention_mask"].sum(1).max()), 1)
        if keep < T:
            out = {k: (v[:, :keep] if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == T else v)
                   for k, v in out.items()}
    return out


class ShardedLoader:
    """A loader whose batches are this rank's share (`shard_batch`) of the global batches; same length everywhere."""

    def __init__(self, loader, parallel: Parallel) -> None:
        self.loader, self.parallel = loader, parallel

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            yield shard_batch(b, self.parallel.rank, self.parallel.world_size)


# ---- the model: FSDP2 per block ----------------------------------------------------------------------------------
def quantized_params(model: torch.nn.Module) -> set[torch.nn.Parameter]:
    """bitsandbytes parameters (4-bit packed weights with their quant_state, int8 weights with their scales)."""
    found = set()
    for p in model.parameters():
        if type(p).__module__.startswith("bitsandbytes"):
            found.add(p)
    return found


def fsdp_available() -> bool:
    """FSDP2 with `set_force_sum_reduction_for_comms` (mid-2025 torch; 2.9 has it): gloo and nccl reduce with a plain
    SUM."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return hasattr(FSDPModule, "set_force_sum_reduction_for_comms")


def check_fsdp_args(parallel: Parallel, args: FSDPArgs, precision: str | None = None,
                    optimizer: str | None = None) -> None:
    """Settings this machine or several ranks cannot honour, refused before the model loads."""
    if parallel.enabled and not fsdp_available():
        raise ValueError(f"several processes need FSDP2's plain SUM reductions (set_force_sum_reduction_for_comms), "
                         f"which torch {torch.__version__} lacks: upgrade torch (2.9 or later has them) or train in "
                         "one process")
    if parallel.enabled and args.cpu_offload and parallel.device.type != "cuda":
        raise ValueError("--fsdp.cpu_offload keeps GPU shards in CPU memory; this run is on the CPU already (FSDP2's "
                         "offload needs an accelerator): leave it out")
    if parallel.enabled and precision == "16-mixed":  # each rank's scaler would find inf in its own shards only
        raise ValueError("--precision 16-mixed (fp16 loss scaling) is not supported on several processes yet: use "
                         "bf16-mixed or bf16-true")
    if parallel.enabled and optimizer and optimizer.startswith("bnb."):  # its kernels take plain tensors only
        raise ValueError(f"--optimizer.name {optimizer}: bitsandbytes' optimizers cannot step FSDP's sharded "
                         "parameters: use AdamW (sharded too, so each process keeps 1/N of its state)")


def shard_model(model: torch.nn.Module, parallel: Parallel, precision: str, args: FSDPArgs) -> list[torch.nn.Module]:
    """fully_shard every transformer block (T5: every encoder and decoder block), then the root (embedding, final
    norm, head and model-level tensors such as virtual tokens). Returns the FSDP modules, root last.

    Mixed precision matches one device: parameters are gathered in their stored dtype (-true: the named type;
    -mixed: fp32 masters) and the loop's autocast casts per op as it does without FSDP; gradients are reduced in
    fp32. Gradients are summed over ranks (divide factor 1): the loss is already divided by the global token count.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    check_fsdp_args(parallel, args, precision)
    mesh = init_device_mesh(parallel.device.type, (parallel.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32, cast_forward_inputs=False)
    offload = CPUOffloadPolicy() if args.cpu_offload else OffloadPolicy()
    ignored = quantized_params(model)
    kwargs = dict(mesh=mesh, mp_policy=policy, offload_policy=offload, ignored_params=ignored or None)
    blocks = list(transformer_blocks(model))
    for block in blocks:
        fully_shard(block, reshard_after_forward=args.reshard_after_forward, **kwargs)
    fully_shard(model, **kwargs)
    for module in (*blocks, model):  # per FSDP module, not recursive
        module.set_gradient_divide_factor(1.0)
        module.set_force_sum_reduction_for_comms(True)  # a plain SUM (gloo has no pre-multiplied sum)
    if hasattr(model, "set_reduce_scatter_unused_params"):  # torch >= 2.12; older: supervised_ce_sum never skips
        model.set_reduce_scatter_unused_params(True)  # the head, so every rank has the same gradients to reduce
    # the root returns hidden states for the chunked loss (a view); the loop never writes into them in place
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    return [*blocks, model]


def transformer_blocks(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The repeated blocks FSDP shards one by one (the model kind's `blocks`)."""
    yield from blocks(model)


def fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def consolidated(model: torch.nn.Module, parallel: Parallel, frozen: bool = True) -> Iterator[bool]:
    """The whole model on rank 0 for the block, so the method's own save writes the consolidated folder from the model
    as in one process: the full state dict is gathered tensor by tensor into rank 0's CPU memory (collective), and
    rank 0's `model.state_dict()` / `named_parameters()` serve it. `frozen=False` gathers only the trained tensors
    (an adapter's save needs no base). Yields whether this rank should write."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not parallel.enabled:
        yield True
        return
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                              ignore_frozen_params=not frozen))
    if not parallel.is_main:
        yield False
        return
    names = [n for n, _ in model.named_parameters()]
    model.state_dict = lambda *args, **kwargs: dict(sd)
    model.named_parameters = lambda *args, **kwargs: iter([(n, sd[n]) for n in names if n in sd])
    try:
        yield True
    finally:
        del model.state_dict, model.named_parameters  # the class's methods again


# ---- checkpoints: sharded saves with torch.distributed.checkpoint --------------------------------------------------
def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, **kw)


def save_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trainable tensors and the optimizer state into `path/dcp` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=_state_options())
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(Path(path) / DCP_DIR))


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load `path/dcp` into this run's model and optimizer, whatever the world size that wrote it (DCP reshards;
    one process without a process group reads every shard). Read through `dcp_load`: torch's own reader would
    unpickle `.metadata` and the shards' non-tensor items with plain pickle, running whatever a folder holds."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = Path(path) / DCP_DIR
    # checked first: inside dcp.load a refusal is retried as rank-local metadata and reported as that one's absence
    load_dcp_metadata(folder / ".metadata")
    msd, osd = get_state_dict(model, optimizer, options=_state_options())
    sd = {"model": msd, "optim": osd}
    with warnings.catch_warnings():  # one process: DCP says it reads every shard itself, which is the point
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process.*")
        dcp_load(sd, folder)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_state_options(strict=False))


def load_full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, full: dict,
                        trainable: list[str]) -> None:
    """Shard a one-process optimizer state (param ids 0..k in `trainable` order) into this rank's optimizer."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    fqn = {i: n for i, n in enumerate(trainable)}
    osd = {"state": {fqn[i]: s for i, s in full["state"].items()},
           "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in full["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, osd, options=_state_options(full_state_dict=True))


@contextlib.contextmanager
def shared_atomic_dir(final_dir: Path, parallel: Parallel) -> Iterator[Path]:
    """`leantune.checkpoint.io.atomic_dir` for a folder every rank writes into: rank 0 makes the hidden temporary
    sibling and tells the others its name; after all ranks finished (a barrier), rank 0 renames it into place. A
    rank that dies mid-write leaves only the hidden temporary, which the next run's folder preparation removes."""
    if not parallel.enabled:
        with atomic_dir(final_dir) as tmp:
            yield tmp
        return
    if parallel.is_main:
        with atomic_dir(final_dir) as tmp:
            parallel.broadcast(str(tmp))
            yield tmp
            parallel.barrier()
    else:
        tmp = Path(parallel.broadcast(None))
        yield tmp
        parallel.barrier()
    parallel.barrier()  # the folder is in place before any rank goes on (a later save may replace it)


def rank_streams(state) -> dict[str, Any]:
    return {"rng_cpu": state.rng_cpu, "rng_cuda": state.rng_cuda, "epoch_rng_cpu": state.epoch_rng_cpu,
            "epoch_rng_cuda": state.epoch_rng_cuda}


def restore_rank_streams(state, ranks: list[dict] | None, parallel: Parallel) -> bool:
    """Give this rank its own saved RNG streams when the world size is the one that wrote them (exact dropout
    continuation); with another world size rank 0 keeps the main stream and other ranks keep their fresh seeds."""
    if not ranks or len(ranks) != parallel.world_size:
        if parallel.rank > 0:
            state.rng_cpu, state.rng_cuda, state.epoch_rng_cpu, state.epoch_rng_cuda = None, [], None, []
        return False
    for k, v in ranks[parallel.rank].items():
        setattr(state, k, v)
    return True


# ---- the launcher: `--devices N [--num_nodes M]` re-executes the command under torchrun -----------------------------
def check_batch_sizes(micro_batch_size: int, global_batch_size: int, processes: int) -> int:
    """Micro-batches per optimizer step on each process; a global batch that the processes' micro batches do not
    divide is refused naming the product (checked before torchrun starts, and again by the loop)."""
    rows = micro_batch_size * processes
    if global_batch_size % rows:
        fits = rows * max(1, round(global_batch_size / rows))
        raise ValueError(f"--train.global_batch_size {global_batch_size} is not a multiple of micro_batch_size "
                         f"{micro_batch_size} x {processes} process{'es' if processes > 1 else ''} = {rows}: pass "
                         f"--train.global_batch_size {fits}, or another --train.micro_batch_size")
    return global_batch_size // rows


def resume_note(out_dir: Path | None) -> str:
    """What a stopped job leaves to continue from, said truthfully (a job killed before its first save has nothing)."""
    if out_dir is None:
        return "Continue from the last complete checkpoint in --out_dir with --resume auto, if there is one."
    latest = find_latest_checkpoint(out_dir) if Path(out_dir).is_dir() else None
    if latest is None:
        return (f"No checkpoint was written yet in {out_dir}, so there is nothing to resume: run the command again "
                "(with --overwrite true to replace the partial output).")
    return f"The last complete checkpoint, {latest}, is intact: continue with --resume auto."


def launch(argv: list[str], devices: int, num_nodes: int = 1, module: str = "leantune.cli",
           out_dir: Path | None = None) -> None:
    """Run `python -m <module> <argv>` on `devices` processes per node through torchrun's elastic agent (in this
    process). One node: a private rendezvous on a free local port. Several nodes: run the same command on each
    node with MASTER_ADDR and MASTER_PORT of the first (c10d rendezvous there) and a shared job id
    (LEANTUNE_RDZV_ID, else SLURM_JOB_ID). When a rank dies the agent stops the others and this raises
    DistributedJobError naming the rank and its exit cause and what `out_dir` holds to resume; nothing is
    restarted."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = ["--nproc_per_node", str(devices), "--nnodes", str(num_nodes), "--max_restarts", "0",
            "--monitor_interval", "0.5"]
    if num_nodes == 1:
        args.append("--standalone")
    else:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if missing:
            raise ValueError(f"--num_nodes {num_nodes}: set {' and '.join(missing)} to the first node's address "
                             "and a free port on it (the rendezvous endpoint), the same on every node")
        job = os.environ.get("LEANTUNE_RDZV_ID") or os.environ.get("SLURM_JOB_ID") or "leantune"
        args += ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
                 "--rdzv_id", job]
    # torchrun gives each worker 1 CPU thread unless told; split this node's cores instead (--threads still wins)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))
    parsed = get_args_parser().parse_args([*args, "-m", module, *argv])
    try:
        run(parsed)
    except ChildFailedError as e:
        raise DistributedJobError(describe_failure(e, out_dir)) from None
    except SignalException as e:  # the agent stopped every worker before raising
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None
        raise DistributedJobError(f"the launcher received {e.sigval.name} and stopped every rank. "
                                  f"{resume_note(out_dir)}") from None


def describe_failure(e, out_dir: Path | None = None) -> str:
    """'rank 1 was killed by SIGKILL; the launcher stopped the other ranks (0)...' from torchrun's ChildFailedError.
    The cause is the first failure that is not the launcher's own SIGTERM to the survivors."""
    def cause(f) -> str:
        if f.exitcode >= 0:
            return f"exited with status {f.exitcode}"
        try:
            return f"was killed by {signal.Signals(-f.exitcode).name}"
        except ValueError:
            return f"was killed by signal {-f.exitcode}"

    failures = sorted(e.failures.items(), key=lambda kv: (kv[1].exitcode == -signal.SIGTERM, kv[1].timestamp, kv[0]))
    rank, first = failures[0]
    others = sorted(r for r, _ in failures[1:])
    stopped = f"; the launcher stopped the other rank(s) ({', '.join(map(str, others))})" if others else ""
    return (f"rank {rank} {cause(first)}{stopped}. {resume_note(out_dir)} The rank's own error, if it printed one, is "
            "above.")
