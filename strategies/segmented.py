"""FedAvg per block: block segmentation of draft-yang-dmsc-distributed-model-03, 6.2.5-6.2.7.

The model's flat parameter vector is cut into blocks (:mod:`dmsc_fed.segmentation.block`);
every site trains the whole model on its data but returns only the blocks it was
assigned, every block is trained by ``r`` sites each round, and each block is
averaged, weighted by sample count, over the sites that returned it. A block that no
valid reply carried keeps its previous values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp import Grid

from dmsc_fed.privacy.he import flatten, unflatten
from dmsc_fed.segmentation.block import BlockPlan, aggregate_blocks
from dmsc_fed.sites import SiteInfo
from dmsc_fed.wire import (
    ARRAYS_KEY,
    BLOCK_PREFIX,
    METRICS_KEY,
    NUM_EXAMPLES_KEY,
    SEGMENT_BLOCKS,
    SEGMENT_LENGTHS,
    SEGMENT_OFFSETS,
)
from strategies.fedavg import WeightedFedAvg
from strategies.validation import check_metrics


def block_key(index: int) -> str:
    """Record key of block ``index`` in a site's update."""
    return f"{BLOCK_PREFIX}{index:05d}"


def check_block_reply(
    content: RecordDict, *, max_examples: int, plan: BlockPlan, blocks: tuple[int, ...]
) -> str | None:
    """Why a block-mode reply must be left out: wrong blocks, lengths, dtypes or non-finite values."""
    reason = check_metrics(content, max_examples)
    if reason is not None:
        return reason
    arrays = content.get(ARRAYS_KEY)
    if not isinstance(arrays, ArrayRecord):
        return f"no ArrayRecord under {ARRAYS_KEY!r}"
    expected = {block_key(i) for i in blocks}
    if set(arrays) != expected:
        return f"expected blocks {sorted(blocks)}, got {sorted(arrays)}"
    for i in blocks:
        arr = arrays[block_key(i)]
        if str(arr.dtype) != "float32" or tuple(arr.shape) != (plan.blocks[i].length,):
            return f"block {i} must be float32 of shape ({plan.blocks[i].length},), got {arr.dtype} {tuple(arr.shape)}"
        if not np.isfinite(arr.numpy()).all():
            return f"block {i} has non-finite values"
    return None


class BlockFedAvg(WeightedFedAvg):
    """Weighted FedAvg per block over the sites that trained it.

    Parameters
    ----------
    plan
        The block plan over the member sites (by name).

    """

    def __init__(self, *, plan: BlockPlan, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plan = plan

    def _blocks_of(self, node: int) -> tuple[int, ...]:
        return self.plan.blocks_of(site=self.sites[node].name)

    def train_nodes(self, grid: Grid) -> list[int]:
        """Every connected member site with blocks trains (replication needs all of them)."""
        connected = set(grid.get_node_ids())
        return sorted(n for n in self.sites if n in connected and n not in self.retired and self._blocks_of(n))

    def node_config(self, node: int, config: ConfigRecord) -> ConfigRecord:
        """The shared config plus the blocks this node must return."""
        blocks = self._blocks_of(node)
        out = ConfigRecord(dict(config))
        out[SEGMENT_BLOCKS] = list(blocks)
        out[SEGMENT_OFFSETS] = [self.plan.blocks[i].offset for i in blocks]
        out[SEGMENT_LENGTHS] = [self.plan.blocks[i].length for i in blocks]
        return out

    def check_train(self, site: SiteInfo, content: RecordDict, server_round: int) -> str | None:
        """A block reply must carry exactly the site's blocks, float32, finite."""
        return check_block_reply(
            content, max_examples=site.num_train, plan=self.plan, blocks=self.plan.blocks_of(site=site.name)
        )

    def aggregate_arrays(self, accepted: list[tuple[SiteInfo, RecordDict]]) -> ArrayRecord:
        """Average each block over the sites that returned it; untouched blocks keep their values."""
        assert self.current is not None
        base_arrays = {k: a.numpy() for k, a in self.current.items()}
        flat, layout = flatten(base_arrays)
        updates = {
            site.name: {
                i: c[ARRAYS_KEY][block_key(i)].numpy().astype(np.float64)  # type: ignore[union-attr]
                for i in self.plan.blocks_of(site=site.name)
            }
            for site, c in accepted
        }
        weights = {site.name: float(c[METRICS_KEY][NUM_EXAMPLES_KEY]) for site, c in accepted}  # type: ignore[arg-type]
        averaged = aggregate_blocks(updates=updates, weights=weights, plan=self.plan)
        merged = self.plan.merge(base=flat, values=averaged)
        out = unflatten(merged, layout)
        return ArrayRecord({k: Array(np.ascontiguousarray(v.astype(base_arrays[k].dtype))) for k, v in out.items()})
