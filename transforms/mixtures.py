"""OpenVLA's named dataset mixtures (``OXE_NAMED_MIXTURES`` of ``oxe/mixtures.py``) as data, and their
expansion into the datasets OpenVLA actually loads.

``OXE_NAMED_MIXTURES`` keeps OpenVLA's lists verbatim: order, sampling weights, and repeats (``rtx_franka``
lists four datasets twice). ``expand_mixture`` applies OpenVLA's ``get_oxe_dataset_kwargs_and_weights``:

  1. a dataset listed again is skipped (the first listing and its weight win);
  2. a dataset whose action encoding OpenVLA does not train on (JOINT_POS: ``berkeley_rpt`` in
     ``rtx_franka``) is skipped, as ``make_oxe_dataset_kwargs`` refuses it;

and returns the remaining ``(dataset, weight)`` pairs in order plus what was skipped and why. Every name
must be a registered dataset. Weights are OpenVLA's raw sampling weights (it normalizes them itself).

Read from openvla/openvla ``prismatic/vla/datasets/rlds/oxe/mixtures.py`` (commits bc8412af and ffe37d71
agree; commented-out entries are not part of a mixture).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

# fmt: off
_RTX = (
    ("fractal20220817_data", 0.54087122203),
    ("kuka", 0.8341046294),
    ("bridge_orig", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 2.0),
    ("berkeley_cable_routing", 3.0),
    ("roboturk", 1.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 1.0),
    ("toto", 1.0),
)
_MAGIC_SOUP_CORE = (
    ("kuka", 0.8341046294),
    ("bridge_orig", 1.0),
    ("taco_play", 2.0),
    ("jaco_play", 1.0),
    ("berkeley_cable_routing", 1.0),
    ("roboturk", 2.0),
    ("viola", 2.0),
    ("berkeley_autolab_ur5", 2.0),
    ("toto", 1.0),
)
_MAGIC_SOUP_TAIL = (
    ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
    ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
    ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
    ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
    ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
    ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
    ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
    ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
    ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
    ("utaustin_mutex", 1.0),
    ("berkeley_fanuc_manipulation", 2.0),
    ("cmu_stretch", 1.0),
)
_LIBERO = ("libero_spatial_no_noops", "libero_object_no_noops", "libero_goal_no_noops", "libero_10_no_noops")
_TDROID = ("tdroid_carrot_in_bowl", "tdroid_pour_corn_in_pot", "tdroid_flip_pot_upright",
           "tdroid_move_object_onto_plate", "tdroid_knock_object_over", "tdroid_cover_object_with_towel")

OXE_NAMED_MIXTURES: dict[str, tuple[tuple[str, float], ...]] = {
    # === Bridge V2 ===
    "bridge": (("bridge_orig", 1.0),),
    "bridge_rt_1": (("bridge_orig", 1.0), ("fractal20220817_data", 1.0)),
    # === RT-X ===
    "rtx": _RTX,
    "rtx_franka": _RTX + (
        ("taco_play", 1.0),
        ("berkeley_cable_routing", 1.0),
        ("viola", 1.0),
        ("toto", 1.0),
        ("stanford_hydra_dataset_converted_externally_to_rlds", 1.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 3.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("maniskill_dataset_converted_externally_to_rlds", 0.1),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("cmu_franka_exploration_dataset_converted_externally_to_rlds", 5.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("berkeley_rpt_converted_externally_to_rlds", 1.0),
        ("kaist_nonprehensile_converted_externally_to_rlds", 3.0),
        ("stanford_robocook_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
        ("utaustin_mutex", 1.0),
        ("cmu_play_fusion", 1.0),
    ),
    # === Open-X Magic Soup ===
    "oxe_magic_soup": (("fractal20220817_data", 0.54087122203),) + _MAGIC_SOUP_CORE
                      + (("language_table", 0.1),) + _MAGIC_SOUP_TAIL,
    # === Open-X Magic Soup++ ===
    "oxe_magic_soup_plus": (("fractal20220817_data", 0.54087122203),) + _MAGIC_SOUP_CORE
                           + (("language_table", 0.1),) + _MAGIC_SOUP_TAIL
                           + (("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2), ("droid", 0.06)),
    "oxe_magic_soup_plus_minus": (("fractal20220817_data", 1.0),) + _MAGIC_SOUP_CORE + _MAGIC_SOUP_TAIL
                                 + (("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2)),
    # === T-DROID ===
    **{name: ((name, 1.0),) for name in _TDROID},
    # === DROID fine-tuning ===
    "droid_wipe": (("droid_wipe", 1.0),),
    # === LIBERO (modified versions) ===
    **{name: ((name, 1.0),) for name in _LIBERO},
    "libero_mix": tuple((name, 1.0) for name in _LIBERO),
}
# fmt: on


class UnknownMixtureError(KeyError):
    """A mixture name OpenVLA does not define, or a dataset of it the registry does not know."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0])


@dataclasses.dataclass(frozen=True)
class MixtureExpansion:
    """What OpenVLA loads for a named mixture.

    datasets: ((dataset, weight), ...) in OpenVLA's order, repeats and refused datasets removed
    skipped:  ((dataset, weight, reason), ...) for every listed entry left out
    """

    name: str
    datasets: tuple[tuple[str, float], ...]
    skipped: tuple[tuple[str, float, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.datasets)


def mixture(name: str) -> tuple[tuple[str, float], ...]:
    """OpenVLA's list for ``name`` as written (repeats kept); ``UnknownMixtureError`` for other names."""
    try:
        return OXE_NAMED_MIXTURES[name]
    except KeyError:
        raise UnknownMixtureError(
            f"expected a mixture of OpenVLA's OXE_NAMED_MIXTURES, got {name!r}; known: {sorted(OXE_NAMED_MIXTURES)!r}; "
            f"hint: name datasets one by one with --dataset NAME=PATH instead"
        ) from None


def expand_mixture(name: str, registry: Mapping | None = None) -> MixtureExpansion:
    """``name`` -> the datasets and weights OpenVLA trains on (see the module doc for the two rules).

    ``registry`` maps names to ``DatasetSpec`` (default: the built-ins); a listed dataset missing from it
    raises ``UnknownMixtureError``.
    """
    if registry is None:
        from vlaprep.transforms.registry import REGISTRY as registry  # noqa: N811 - lazy: registry imports us not
    datasets, skipped, seen = [], [], set()
    for dataset, weight in mixture(name):
        if dataset not in registry:
            raise UnknownMixtureError(
                f"expected every dataset of mixture {name!r} in the registry, got unknown {dataset!r}; "
                f"hint: add it with --registry FILE"
            )
        if dataset in seen:
            skipped.append((dataset, weight, "listed again in the mixture; OpenVLA keeps the first listing"))
            continue
        seen.add(dataset)
        spec = registry[dataset]
        if not spec.openvla_trainable:
            skipped.append((
                dataset, weight,
                f"action encoding {spec.action_encoding.value}: OpenVLA loads only EEF_POS and EEF_R6 actions",
            ))
            continue
        datasets.append((dataset, weight))
    return MixtureExpansion(name, tuple(datasets), tuple(skipped))
