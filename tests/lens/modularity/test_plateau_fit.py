"""lens.modularity.plateau_fit: the plateau rule against hand-made curves."""

import pytest

from lens.modularity.plateau_fit import PlateauRule


def test_plateau_rule_on_hand_made_curves():
    rule = PlateauRule("max", min_delta=0.0, patience=2)
    # best at index 2 (0.5); indices 3, 4 do not beat it -> stop at 4
    assert rule.scan([0.1, 0.3, 0.5, 0.5, 0.4, 0.9]) == {"stop": 4, "best": 2, "reason": "plateau"}
    assert rule.scan([0.1, 0.2, 0.3]) == {"stop": None, "best": 2, "reason": None}
    target = PlateauRule("max", 0.0, 5, target=0.99)
    assert target.scan([0.2, 0.995, 0.999]) == {"stop": 1, "best": 1, "reason": "target"}
    # relative min_delta on a loss: 1.0 -> 0.9995 is < 0.1% better, so it counts as no gain
    rel = PlateauRule("min", 1e-3, 2, relative=True)
    assert rel.scan([1.0, 0.9995, 0.9991, 0.5]) == {"stop": 2, "best": 0, "reason": "plateau"}
    assert rel.scan([1.0, 0.99, 0.98, 0.97]) == {"stop": None, "best": 3, "reason": None}
    with pytest.raises(ValueError, match="mode"):
        PlateauRule("up")
    with pytest.raises(ValueError, match="patience"):
        PlateauRule("max", patience=0)
