import numpy as np

from vlaprep.pipelines.stats.exact import HISTOGRAM_BINS, MomentsAccumulator, SelectionAccumulator, plan_order_statistics


def test_display_histogram_counts_every_value_once_in_equal_width_bins():
    rows = np.array([[0.0, 5.0], [1.0, 5.0], [0.5, 5.0], [0.26, 5.0]], np.float32)
    plan = plan_order_statistics(MomentsAccumulator(2).add(rows))
    halves = [SelectionAccumulator(2).add(rows[:2], plan), SelectionAccumulator(2).add(rows[2:], plan)]
    hist = halves[0].merge(halves[1]).histogram
    assert hist.shape == (2, HISTOGRAM_BINS)
    assert hist[0].sum() == 4 and hist[1].sum() == 4
    # dim 0 spans [0, 1]: 0 -> bin 0, 0.26 -> bin 16, 0.5 -> bin 32, 1.0 (the max) -> last bin
    assert hist[0, 0] == 1 and hist[0, 16] == 1 and hist[0, 32] == 1 and hist[0, HISTOGRAM_BINS - 1] == 1
    assert hist[1, 0] == 4  # a constant dim lands in the first bin
