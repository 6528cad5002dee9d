"""OpenVLA's named mixtures (oxe/mixtures.py, written out here entry by entry) and their expansion into
the datasets OpenVLA loads (get_oxe_dataset_kwargs_and_weights: repeats skipped, non-EEF actions refused)."""

import pickle

import pytest

from vlaprep.transforms.mixtures import (
    OXE_NAMED_MIXTURES,
    MixtureExpansion,
    UnknownMixtureError,
    expand_mixture,
    mixture,
)
from vlaprep.transforms.registry import REGISTRY

# openvla/openvla prismatic/vla/datasets/rlds/oxe/mixtures.py, uncommented entries in order.
OPENVLA_MIXTURES = {
    "bridge": [("bridge_orig", 1.0)],
    "bridge_rt_1": [("bridge_orig", 1.0), ("fractal20220817_data", 1.0)],
    "rtx": [
        ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 2.0), ("berkeley_cable_routing", 3.0), ("roboturk", 1.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 1.0), ("toto", 1.0),
    ],
    "rtx_franka": [
        ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 2.0), ("berkeley_cable_routing", 3.0), ("roboturk", 1.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 1.0), ("toto", 1.0),
        ("taco_play", 1.0), ("berkeley_cable_routing", 1.0), ("viola", 1.0), ("toto", 1.0),
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
        ("utaustin_mutex", 1.0), ("cmu_play_fusion", 1.0),
    ],
    "oxe_magic_soup": [
        ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 1.0), ("berkeley_cable_routing", 1.0), ("roboturk", 2.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 2.0), ("toto", 1.0), ("language_table", 0.1),
        ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
        ("utaustin_mutex", 1.0), ("berkeley_fanuc_manipulation", 2.0), ("cmu_stretch", 1.0),
    ],
    "oxe_magic_soup_plus": [
        ("fractal20220817_data", 0.54087122203), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 1.0), ("berkeley_cable_routing", 1.0), ("roboturk", 2.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 2.0), ("toto", 1.0), ("language_table", 0.1),
        ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
        ("utaustin_mutex", 1.0), ("berkeley_fanuc_manipulation", 2.0), ("cmu_stretch", 1.0),
        ("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2), ("droid", 0.06),
    ],
    "oxe_magic_soup_plus_minus": [
        ("fractal20220817_data", 1.0), ("kuka", 0.8341046294), ("bridge_orig", 1.0), ("taco_play", 2.0),
        ("jaco_play", 1.0), ("berkeley_cable_routing", 1.0), ("roboturk", 2.0), ("viola", 2.0),
        ("berkeley_autolab_ur5", 2.0), ("toto", 1.0),
        ("stanford_hydra_dataset_converted_externally_to_rlds", 2.0),
        ("austin_buds_dataset_converted_externally_to_rlds", 1.0),
        ("nyu_franka_play_dataset_converted_externally_to_rlds", 3.0),
        ("furniture_bench_dataset_converted_externally_to_rlds", 0.1),
        ("ucsd_kitchen_dataset_converted_externally_to_rlds", 2.0),
        ("austin_sailor_dataset_converted_externally_to_rlds", 1.0),
        ("austin_sirius_dataset_converted_externally_to_rlds", 1.0),
        ("dlr_edan_shared_control_converted_externally_to_rlds", 1.0),
        ("iamlab_cmu_pickup_insert_converted_externally_to_rlds", 1.0),
        ("utaustin_mutex", 1.0), ("berkeley_fanuc_manipulation", 2.0), ("cmu_stretch", 1.0),
        ("bc_z", 0.2), ("fmb_dataset", 1.0), ("dobbe", 0.2),
    ],
    "tdroid_carrot_in_bowl": [("tdroid_carrot_in_bowl", 1.0)],
    "tdroid_pour_corn_in_pot": [("tdroid_pour_corn_in_pot", 1.0)],
    "tdroid_flip_pot_upright": [("tdroid_flip_pot_upright", 1.0)],
    "tdroid_move_object_onto_plate": [("tdroid_move_object_onto_plate", 1.0)],
    "tdroid_knock_object_over": [("tdroid_knock_object_over", 1.0)],
    "tdroid_cover_object_with_towel": [("tdroid_cover_object_with_towel", 1.0)],
    "droid_wipe": [("droid_wipe", 1.0)],
    "libero_spatial_no_noops": [("libero_spatial_no_noops", 1.0)],
    "libero_object_no_noops": [("libero_object_no_noops", 1.0)],
    "libero_goal_no_noops": [("libero_goal_no_noops", 1.0)],
    "libero_10_no_noops": [("libero_10_no_noops", 1.0)],
    "libero_mix": [("libero_spatial_no_noops", 1.0), ("libero_object_no_noops", 1.0), ("libero_goal_no_noops", 1.0),
                   ("libero_10_no_noops", 1.0)],
}


def test_every_mixture_equals_openvla_in_order():
    assert list(OXE_NAMED_MIXTURES) == list(OPENVLA_MIXTURES)
    for name, entries in OPENVLA_MIXTURES.items():
        assert [tuple(e) for e in mixture(name)] == entries, name


def test_every_mixture_dataset_is_registered():
    for entries in OPENVLA_MIXTURES.values():
        for dataset, _ in entries:
            assert dataset in REGISTRY


@pytest.mark.parametrize("name", list(OPENVLA_MIXTURES))
def test_expansion_follows_openvla(name):
    expansion = expand_mixture(name)
    seen, want, skipped = set(), [], []
    for dataset, weight in OPENVLA_MIXTURES[name]:
        if dataset in seen:
            skipped.append(dataset)
            continue
        seen.add(dataset)
        if dataset == "berkeley_rpt_converted_externally_to_rlds":  # JOINT_POS: make_oxe_dataset_kwargs refuses it
            skipped.append(dataset)
            continue
        want.append((dataset, weight))
    assert list(expansion.datasets) == want
    assert [s[0] for s in expansion.skipped] == skipped
    assert expansion.names == tuple(d for d, _ in want)


def test_rtx_franka_skips_repeats_with_their_weights_and_the_joint_position_dataset():
    expansion = expand_mixture("rtx_franka")
    assert dict(expansion.datasets)["taco_play"] == 2.0  # the first listing wins, not the later 1.0
    reasons = {d: r for d, _, r in expansion.skipped}
    assert reasons["taco_play"].startswith("listed again")
    assert "joint_pos" in reasons["berkeley_rpt_converted_externally_to_rlds"]
    assert len(expansion.datasets) == 23


def test_unknown_mixture_and_unknown_dataset():
    with pytest.raises(UnknownMixtureError, match=r"expected a mixture of OpenVLA's OXE_NAMED_MIXTURES, got 'soup'"):
        expand_mixture("soup")
    with pytest.raises(UnknownMixtureError, match="got unknown 'kuka'"):
        expand_mixture("rtx", registry={k: v for k, v in REGISTRY.items() if k != "kuka"})


def test_expansion_pickles():
    e = expand_mixture("oxe_magic_soup_plus")
    assert pickle.loads(pickle.dumps(e)) == e and isinstance(e, MixtureExpansion)
