"""What the two ST stages (st-pretrain, st) share in their configs and model cards, so the
common keys (``data.set_size``, ``model.hidden`` ...) mean the same in both. The model
sections build on ``models.st_model.STShape``."""

from __future__ import annotations

from dataclasses import dataclass

from latentcell.data_pipelines.blocks import StoreMeta

from .sections import check_on_corrupt

__all__ = ["SetDataSection", "role_categories", "store_card"]


@dataclass(frozen=True)
class SetDataSection:
    """path: the store ("" = the built-in one). set_size: cells per set (STATE's small model
    uses 128); sets_per_batch: sets per step per process; num_workers: DataLoader workers;
    buffer_sets: sets shuffled together. on_corrupt: as ``data.on_corrupt`` of the VAE; a set
    touching a skipped unit is left out whole."""

    path: str = ""
    set_size: int = 64
    sets_per_batch: int = 8
    num_workers: int = 0
    buffer_sets: int = 64
    on_corrupt: str = "error"

    def __post_init__(self) -> None:
        check_on_corrupt(self.on_corrupt)
        if min(self.set_size, self.sets_per_batch, self.buffer_sets) < 1 or self.num_workers < 0:
            raise ValueError("set_size, sets_per_batch, buffer_sets >= 1; num_workers >= 0")

    @property
    def batch_size(self) -> int:
        """Items per micro-batch, as DeepSpeed's config counts them: sets."""
        return self.sets_per_batch

    def sampler_options(self, seed: int, train: bool) -> dict:
        """The options both set samplers take from this section. Validation pads too, so
        every rank runs the same number of forwards."""
        return {
            "set_size": self.set_size,
            "seed": seed,
            "shuffle": train,
            "output": "dense",
            "columns": (),  # the role columns (batch, cell type) are always in obs
            "buffer_sets": self.buffer_sets,
            "tail": "pad",
            "on_corrupt": self.on_corrupt,
        }


def role_categories(meta: StoreMeta, roles: tuple[str, ...]) -> dict[str, list[str]]:
    """The vocabulary of each of ``roles`` the store has."""
    return {role: meta.categories[meta.roles[role]] for role in roles if meta.roles.get(role)}


def store_card(meta: StoreMeta, roles: tuple[str, ...]) -> dict:
    """The store's part of an ST model card: genes, role columns and the roles' vocabularies
    (what ``st_stage.load_matching`` compares before loading tensors)."""
    return {
        "genes": [str(g) for g in meta.var.index],
        "gene_symbols": [str(g) for g in meta.var["gene_symbol"]],
        "roles": {r: c for r, c in meta.roles.items() if c},
        "categories": role_categories(meta, roles),
    }
