"""The Debian task's data: Packages stanzas read, split and turned into records (adalora_export.debian)."""

from __future__ import annotations

import pytest

from adalora_export.debian import (
    CHAT_SECTIONS,
    answer_matches,
    first_named,
    match_rates,
    package_index,
    read_packages,
    section_chats,
    section_texts,
    split_by_section,
)
from adalora_export.errors import UserError

STANZAS = """Package: tuxracer
Version: 1.0
Section: contrib/games
Description: Tux the penguin races down snowy slopes
 A 3D racing game in which Tux slides down
 .
 mountains collecting herring.

Package: no-section
Description: a stanza without a section is skipped

Package: gnumeric
Section: math
Description: spreadsheet application for GNOME
"""


def packages_text(per_section: int, sections=CHAT_SECTIONS) -> str:
    return "\n\n".join(
        f"Package: {s}-pkg{i}\nSection: {s}\nDescription: tool number {i} of the {s} section, described at length"
        for s in sections
        for i in range(per_section)
    )


def test_read_packages_joins_continuation_lines_and_keeps_the_last_section_part():
    tux, gnumeric = read_packages(STANZAS)
    assert (tux.name, tux.section, tux.summary) == ("tuxracer", "games", "Tux the penguin races down snowy slopes")
    assert tux.description == (
        "Tux the penguin races down snowy slopes A 3D racing game in which Tux slides down "
        "mountains collecting herring."
    )
    assert gnumeric.section == "math"


def test_split_is_disjoint_stratified_and_fixed_by_its_seed():
    packages = read_packages(packages_text(10))
    splits = split_by_section(packages, CHAT_SECTIONS, {"train": 5, "test": 3})
    assert [len(rows) for rows in splits.values()] == [40, 24]
    names = [p.name for rows in splits.values() for p in rows]
    assert len(names) == len(set(names))
    assert sum(p.section == "games" for p in splits["test"]) == 3
    again = split_by_section(packages, CHAT_SECTIONS, {"train": 5, "test": 3})
    assert [p.name for p in again["test"]] == [p.name for p in splits["test"]]
    other = split_by_section(packages, CHAT_SECTIONS, {"train": 5, "test": 3}, seed=1)
    assert [p.name for p in other["test"]] != [p.name for p in splits["test"]]


def test_split_refuses_a_section_with_too_few_packages():
    with pytest.raises(UserError, match="too few package descriptions in section"):
        split_by_section(read_packages(packages_text(3)), CHAT_SECTIONS, {"train": 3, "test": 1})


def test_duplicate_descriptions_count_once():
    text = packages_text(4) + "\n\n" + packages_text(4).replace("-pkg", "-copy")
    with pytest.raises(UserError, match="need 5 each"):
        split_by_section(read_packages(text), CHAT_SECTIONS, {"train": 4, "test": 1})


def test_records_ask_the_question_and_answer_with_the_section():
    (tux,) = [p for p in read_packages(STANZAS) if p.name == "tuxracer"]
    (chat,) = section_chats([tux])
    user, assistant = chat["messages"]
    assert user["role"] == "user" and "Debian package: tuxracer" in user["content"]
    assert "editors, fonts, games, graphics, mail, math, science or sound" in user["content"]
    assert assistant == {"role": "assistant", "content": "games"}
    assert section_texts([tux]) == [{"text": tux.description, "label": "games"}]


def test_answers_are_read_strictly_and_by_the_first_section_named():
    assert answer_matches(" Games.", "games") and not answer_matches("games, I think", "games")
    assert first_named("It is in the games section, not math.") == "games"
    assert first_named("The Debian section is unknown") is None
    assert match_rates(["games", "It belongs in math", "fonts"], ["games", "math", "sound"]) == {
        "exact_match": pytest.approx(1 / 3),
        "named_match": pytest.approx(2 / 3),
    }


def test_a_missing_packages_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read the package index"):
        package_index(tmp_path / "Packages")
