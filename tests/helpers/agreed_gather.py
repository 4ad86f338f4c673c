"""Run under torchrun: ``dist.gather_on_main``. Each rank prints what it got: rank 0 every rank's
result, the others None; then, with rank 1 failing, every rank prints the error it raised."""

from dtrain import train
from dtrain.dist import gather_on_main, init_distributed, shutdown
from dtrain.errors import StorageError

ctx = init_distributed("cpu")
print(f"rank {ctx.rank} got {gather_on_main(ctx, lambda: ctx.rank * 10)}", flush=True)


def fails_on_rank_1():
    if ctx.rank == 1:
        raise StorageError("the store on rank 1 failed")
    return ctx.rank


try:
    gather_on_main(ctx, fails_on_rank_1)
except StorageError as error:
    print(f"rank {ctx.rank} raised StorageError: {error}", flush=True)
shutdown(ctx)
train.exit_now(0)
