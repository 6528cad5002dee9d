"""ActionTokenizer: OpenVLA's worked examples exactly, bin edges, the proved error bounds, mu-law."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vlaprep.transforms.action_tokenizer import ActionTokenizer, parse_action_encoding

TOK = ActionTokenizer()
MU = ActionTokenizer(encoding="mu_law")
HALF_BIN = 1 / 255  # half of the bin width 2/255
FP_SLACK = 1e-15  # float64 rounding of the linspace edges and the centers


def test_openvla_worked_example_exact():
    x = np.array([-1.0, 0.0, 0.5, 0.999, 1.0])
    ids = TOK.encode(x)
    assert ids.dtype == np.int64
    assert ids.tolist() == [31999, 31872, 31808, 31745, 31744]
    values = TOK.decode(ids)
    assert values.dtype == np.float64
    assert np.round(values, 6).tolist() == [-0.996078, 0.0, 0.501961, 0.996078, 0.996078]
    # Closed forms: centers are -1 + (2k + 1)/255.
    assert values[1] == 0.0
    np.testing.assert_allclose(values, [-254 / 255, 0.0, 128 / 255, 254 / 255, 254 / 255], rtol=0, atol=FP_SLACK)


def test_gripper_and_float32_inputs():
    assert TOK.encode(np.array([0.0, 1.0], np.float32)).tolist() == [31872, 31744]
    assert TOK.encode(np.array([[0, 1]])).tolist() == [[31872, 31744]]  # ints are fine, shape kept
    assert TOK.encode(0.5).shape == () and int(TOK.encode(0.5)) == 31808


def test_token_id_range():
    assert (TOK.min_token_id, TOK.max_token_id) == (31744, 31999)
    t = ActionTokenizer(vocab_size=33000)
    assert (t.min_token_id, t.max_token_id) == (32744, 32999)
    ids = t.encode(np.linspace(-2, 2, 1001))
    assert ids.min() == 32744 and ids.max() == 32999
    np.testing.assert_array_equal(TOK.is_action_token([31743, 31744, 31999, 32000]), [False, True, True, False])


def test_saturation_and_infinities():
    assert TOK.encode(np.array([-np.inf, -5.0, 5.0, np.inf])).tolist() == [31999, 31999, 31744, 31744]


def test_digitize_boundaries_exactly_at_bin_edges():
    edges = TOK.bins
    assert edges.shape == (256,) and edges[0] == -1.0 and edges[-1] == 1.0
    for i, e in enumerate(edges):
        # digitize(right=False): an edge belongs to the bin on its right -> digitize = i + 1.
        assert int(TOK.encode(e)) == 32000 - (i + 1)
        if i > 0:
            assert int(TOK.encode(np.nextafter(e, -np.inf))) == 32000 - i


def test_decode_clips_out_of_range_ids_like_openvla():
    # vocab - id - 1 is clipped to [0, 254]: ids below the range decode like 31744, above like 31999.
    np.testing.assert_array_equal(TOK.decode([31000, 31744]), [TOK.bin_centers[-1]] * 2)
    np.testing.assert_array_equal(TOK.decode([31999, 32005]), [TOK.bin_centers[0]] * 2)


def test_encode_decode_id_fixpoint():
    ids = np.arange(31744, 32000)
    again = TOK.encode(TOK.decode(ids))
    # Every id is its own fixpoint except 31744 (x = 1.0 exactly), whose center belongs to 31745.
    np.testing.assert_array_equal(again[1:], ids[1:])
    assert again[0] == 31745


# The bound: for every finite x, |decode(encode(x)) - clip(x, -1, 1)| <= 1/(n_bins - 1).
# Proof: clip(x) in [e_{k-1}, e_k) gives digitize k and decodes to the center of that bin; x = 1 gives
# k = n_bins, clipped to the last center 1 - 1/(n_bins - 1). It is attained at every left edge.


@settings(max_examples=500, deadline=None)
@given(x=st.lists(st.floats(allow_nan=False), min_size=1, max_size=64))
def test_uniform_round_trip_within_half_a_bin(x):
    x = np.asarray(x)
    err = np.abs(TOK.decode(TOK.encode(x)) - np.clip(x, -1, 1))
    assert np.all(err <= HALF_BIN + FP_SLACK)


@settings(max_examples=300, deadline=None)
@given(x=st.floats(-1 + 1 / 255, 1 - 1 / 255), float32=st.booleans())
def test_uniform_round_trip_interior_float32_and_float64(x, float32):
    x = np.float32(x) if float32 else np.float64(x)
    assert abs(float(TOK.decode(TOK.encode(x))) - float(x)) <= HALF_BIN + FP_SLACK


def test_uniform_bound_is_attained_at_left_edges_and_at_one():
    left_edges = TOK.bins[:-1]
    err = np.abs(TOK.decode(TOK.encode(left_edges)) - left_edges)
    np.testing.assert_allclose(err, HALF_BIN, rtol=0, atol=FP_SLACK)
    assert abs(float(TOK.decode(TOK.encode(1.0))) - 1.0) == pytest.approx(HALF_BIN, abs=FP_SLACK)


@settings(max_examples=100, deadline=None)
@given(
    n_bins=st.integers(2, 1024),
    extra=st.integers(1, 5000),
    x=st.lists(st.floats(-1.5, 1.5), min_size=1, max_size=32),
)
def test_round_trip_bound_for_any_bin_count(n_bins, extra, x):
    tok = ActionTokenizer(vocab_size=n_bins + extra, n_bins=n_bins)
    x = np.asarray(x)
    ids = tok.encode(x)
    assert np.all((ids >= tok.min_token_id) & (ids <= tok.max_token_id))
    assert np.all(np.abs(tok.decode(ids) - np.clip(x, -1, 1)) <= 1 / (n_bins - 1) + FP_SLACK)


# --- mu-law ----------------------------------------------------------------------------------------


def test_mu_law_hand_values():
    # C(0.5) = ln(128.5)/ln(256) = 0.87570; (C + 1) * 127.5 = 239.15 -> digitize 240 -> id 31760.
    assert MU.encode(np.array([-1.0, 0.0, 0.5, 1.0])).tolist() == [31999, 31872, 31760, 31744]
    c = -1 + 479 / 255  # center of bin 239
    assert float(MU.decode(31760)) == pytest.approx((256**c - 1) / 255, abs=1e-12)
    assert float(MU.decode(31872)) == 0.0
    assert float(MU.compand(1.0)) == 1.0 and float(MU.compand(-1.0)) == -1.0
    assert float(MU.compand(0.5)) == pytest.approx(np.log(128.5) / np.log(256), abs=1e-15)


@settings(max_examples=500, deadline=None)
@given(
    x=st.lists(st.floats(allow_nan=False), min_size=1, max_size=64),
    mu=st.sampled_from([1.0, 10.0, 255.0, 1000.0]),
)
def test_mu_law_round_trip_within_half_a_companded_bin(x, mu):
    tok = ActionTokenizer(encoding="mu_law", mu=mu)
    x = np.asarray(x)
    ids = tok.encode(x)
    decoded = tok.decode(ids)
    # Half a bin in companded space, the same proof as for uniform bins.
    assert np.all(np.abs(tok.compand(decoded) - tok.compand(np.clip(x, -1, 1))) <= HALF_BIN + 1e-12)
    # Equivalently the decoded value lies in x's own (uncompanded) bin: the ids are fixpoints,
    # except the top id (x == 1.0 exactly) as in the uniform case.
    top = ids == tok.min_token_id
    np.testing.assert_array_equal(tok.encode(decoded)[~top], ids[~top])


@settings(max_examples=200, deadline=None)
@given(y=st.floats(-1, 1), mu=st.floats(0.01, 1e4))
def test_compand_expand_inverse(y, mu):
    tok = ActionTokenizer(encoding="mu_law", mu=mu)
    assert float(tok.expand(tok.compand(y))) == pytest.approx(y, abs=1e-12)


def test_mu_law_bins_are_finer_near_zero():
    centers = MU.decode(np.arange(31744, 32000))
    widths = np.diff(np.sort(np.unique(centers)))
    assert widths.min() < 0.001 and widths.max() > 0.03


# --- parsing, validation, pickling -------------------------------------------------------------------


def test_parse_action_encoding():
    assert parse_action_encoding("uniform") == ("uniform", 255.0)
    assert parse_action_encoding("mu_law") == ("mu_law", 255.0)
    assert parse_action_encoding("mu_law:100") == ("mu_law", 100.0)
    assert ActionTokenizer.from_encoding("mu_law:7", vocab_size=1000) == ActionTokenizer(1000, 256, "mu_law", 7.0)
    for bad, match in [
        ("mu_law:0", "expected mu > 0"),
        ("mu_law:-3", "expected mu > 0"),
        ("mu_law:x", "expected mu_law:MU with a number"),
        ("uniform:3", "expected \"uniform\""),
        ("linear", "expected \"uniform\""),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_action_encoding(bad)


def test_validation_messages_carry_values():
    with pytest.raises(ValueError, match=r"expected mu > 0 \(finite\), got -1"):
        ActionTokenizer(encoding="mu_law", mu=-1)
    with pytest.raises(ValueError, match="expected n_bins >= 2, got 1"):
        ActionTokenizer(n_bins=1)
    with pytest.raises(ValueError, match="expected vocab_size > n_bins .* vocab_size=256, n_bins=256"):
        ActionTokenizer(vocab_size=256)
    with pytest.raises(ValueError, match="expected encoding in"):
        ActionTokenizer(encoding="mulaw")
    with pytest.raises(TypeError, match="expected an int n_bins"):
        ActionTokenizer(n_bins=256.0)
    with pytest.raises(ValueError, match=r"got NaN at index \(1, 0\)"):
        TOK.encode(np.array([[0.0], [np.nan]]))
    with pytest.raises(TypeError, match="expected integer token ids"):
        TOK.decode(np.array([31744.0]))


def test_pickle_and_equality():
    _ = TOK.bin_centers  # populate the cache; it must travel with the pickle harmlessly
    again = pickle.loads(pickle.dumps(TOK))
    assert again == TOK and hash(again) == hash(TOK)
    assert again.encode(np.array([0.5])).tolist() == [31808]
    assert ActionTokenizer(encoding="mu_law") != TOK
