"""kmsfs.model.line: where a chain of Trusts stands against a store's head (pure, by ids)."""

from kmsfs.model import line

HEAD = ["g", "t1", "t2"]  # the store's head T2, from the genesis


def test_place() -> None:
    assert line.place(["g", "t1", "t2"], HEAD) == line.HEAD
    assert line.place(["g"], HEAD) == line.BEFORE
    assert line.place(["g", "t1"], HEAD) == line.BEFORE
    assert line.place(["g", "t1", "t2", "t3"], HEAD) == line.AFTER
    assert line.place(["g", "t1", "r2"], HEAD) == line.RIVAL
    assert line.place(["g", "t1", "r2", "r3"], HEAD) == line.RIVAL
    assert line.place(["g", "r1"], HEAD) == line.RIVAL
    assert line.place(["g", "t1", "t2", "t3"], ["g"]) == line.AFTER


def test_divergence_names_the_first_link_off_the_line() -> None:
    assert line.divergence(["g", "t1", "r2", "r3"], HEAD) == 2
    assert line.divergence(["g", "t1"], HEAD) == 2
    assert line.divergence(["x"], HEAD) == 0


def test_only_links_after_the_head_can_fork() -> None:
    """A rival of a link up to the head is the store's decided past (no fork); with no head,
    every link past the genesis is checked, as before heads were kept."""
    assert list(line.links_after_head(["g", "t1", "t2", "t3", "t4"], HEAD)) == [3, 4]
    assert list(line.links_after_head(["g", "t1", "t2"], HEAD)) == []
    assert list(line.links_after_head(["g", "t1"], HEAD)) == []
    assert list(line.links_after_head(["g", "t1", "r2"], HEAD)) == []  # refused apart
    assert list(line.links_after_head(["g", "t1", "t2"], None)) == [1, 2]
