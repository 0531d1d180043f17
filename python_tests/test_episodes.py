"""Text-marker episode segmentation on real tokenizer types built offline (byte-level BPE as in GPT-2/Qwen/
SmolLM2, Metaspace BPE as in Llama/SentencePiece) and on the character tokenizer: markers with a leading space,
split across tokens, a blank line emitted as two newline tokens, no marker, a marker as the last token, padding."""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("transformers")

from l2t_ext.lm.markers import token_texts  # noqa: E402
from l2t_ext.reward import segment_episodes  # noqa: E402

CORPUS = ["One. Two! Three? Four. Add 3 and 4.",
          "Step one: add 3 and 4 to get 7.\n\nStep two: double it, 14. </think>The answer is 14.",
          "First, 12 - 5 = 7.\nThen 7 * 2 = 14!\n\n</think> So 14.", "We check: 2 + 2 = 4? Yes.\n\nDone.</think>4"] * 50


def _bpe(kind: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=None if kind == "bytelevel" else "<unk>"))
    if kind == "bytelevel":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tk.pre_tokenizer = pre_tokenizers.Metaspace()
        tk.decoder = decoders.Metaspace()
        alphabet = sorted(set("".join(CORPUS)))
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<pad>", "</s>"], initial_alphabet=alphabet)
    tk.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module", params=["bytelevel", "metaspace"])
def tok(request):
    return _bpe(request.param)


def _chars(tok, text: str) -> list[int]:
    """``text`` as one token per character (both tokenizers keep every single character in their vocabulary:
    Metaspace as the character itself, byte-level BPE under its byte alias, e.g. "\n" as "Ċ")."""
    ids = []
    for c in text:
        i = tok.convert_tokens_to_ids(c)
        if i == tok.unk_token_id:
            (i,) = tok.encode(c, add_special_tokens=False)
        ids.append(i)
    return ids


def _batch(tok, pieces_per_row, prompt="Q: ", pad_to=None):
    """Rows of [pad..., prompt, response pieces..., </s>]: each piece a string encoded on its own or a list of
    token ids; returns ids and the response mask."""
    rows, masks = [], []
    for pieces in pieces_per_row:
        p = tok.encode(prompt, add_special_tokens=False)
        r = [i for piece in pieces for i in (piece if isinstance(piece, list) else
                                             tok.encode(piece, add_special_tokens=False))] + [tok.eos_token_id]
        rows.append(p + r)
        masks.append([False] * len(p) + [True] * len(r))
    L = pad_to or max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[False] * (L - len(m)) + m for m in masks])
    return ids, mask


def _episode_texts(tok, ids, mask, ep):
    """Per row: the decoded text of each episode, and of the final answer (-1 inside the response)."""
    out = []
    for b in range(ids.shape[0]):
        cols = torch.nonzero(mask[b]).flatten().tolist()
        texts = token_texts(tok, [ids[b, cols].tolist()])[0]
        row = {}
        for j, c in enumerate(cols):
            row.setdefault(int(ep[b, c]), []).append(texts[j])
        out.append({k: "".join(v) for k, v in row.items()})
    return out


def test_think_marker_with_leading_space_and_split_across_tokens(tok):
    ids, mask = _batch(tok, [["Add 3 and 4. </think>The answer is 7."],  # leading space, one encode
                             ["Add 3 and 4.", _chars(tok, "</think>"), "7"],  # one token per character
                             ["no marker at all, 7"]])
    ep = segment_episodes(ids, mask, ["think"], tokenizer=tok)
    texts = _episode_texts(tok, ids, mask, ep)
    # the token holding the marker's last character closes the episode, even when it also holds the next word
    # (Metaspace BPE merges "</think>The" into one token); the final answer holds no part of the marker
    for row, answer in ((texts[0], "answer is 7."), (texts[1], "7")):
        assert "</think>" in row[0] and row[0].rstrip().endswith(("</think>", "</think>The"))
        assert row[-1].endswith(answer) and "<" not in row[-1] and ">" not in row[-1]
    assert set(texts[2]) == {0}  # no marker: one episode, no final answer
    assert (ep[~mask] == -1).all()  # prompt and padding


def test_blank_line_is_found_however_it_is_tokenised(tok):
    nn = _chars(tok, "\n\n")
    ids, mask = _batch(tok, [["Step one.\n\nStep two.\n\nDone"],  # "\n\n" as the tokenizer merges it
                             ["Step one.", nn, "Step two.", nn, "Done"],  # two "\n" tokens
                             ["Step one.\nStep two.\nDone"]])  # single newlines only: not a paragraph
    ep = segment_episodes(ids, mask, ["paragraph"], tokenizer=tok)
    counts = (ep.max(1).values + 1).tolist()
    assert counts == [2, 2, 1], counts
    texts = _episode_texts(tok, ids, mask, ep)
    for row in texts[:2]:
        assert row[0].endswith("\n\n") and row[1].endswith("\n\n") and row[-1].strip() == "Done"
    ep_line = segment_episodes(ids, mask, ["line"], tokenizer=tok)
    assert (ep_line.max(1).values + 1).tolist() == [2, 2, 2]


def test_marker_as_the_last_token_and_sentences(tok):
    ids, mask = _batch(tok, [["Add 3 and 4.", "</think>"], ["One. Two! Three? Four"]], pad_to=40)
    ep = segment_episodes(ids, mask, ["</think>"], tokenizer=tok)
    # the marker closes the last episode; only <eos> is left for the final answer
    assert (ep[0][mask[0]] >= 0).sum() == mask[0].sum() - 1
    ep_s = segment_episodes(ids, mask, ["sentence"], tokenizer=tok)
    texts = _episode_texts(tok, ids, mask, ep_s)[1]
    assert [texts[k].strip() for k in range(3)] == ["One.", "Two!", "Three?"] and texts[-1].strip() == "Four"


def test_regex_and_token_id_markers(tok):
    nn = _chars(tok, "\n\n")
    ids, mask = _batch(tok, [["Step one.", nn, "Step two.", nn, "Done"]])
    ep_re = segment_episodes(ids, mask, [r"re:Step \w+\."], tokenizer=tok)
    assert (ep_re.max(1).values + 1).tolist() == [2]
    ep_ids = segment_episodes(ids, mask, [nn])  # token ids: exact id sequences, no tokenizer needed
    assert torch.equal(ep_ids, segment_episodes(ids, mask, ["paragraph"], tokenizer=tok))


def test_text_markers_equal_token_id_markers_on_the_char_tokenizer():
    """The arithmetic task's single-token ``</think>``: text matching segments exactly as id matching did."""
    from l2t_ext.tasks import arith

    tok = arith.tokenizer()
    rng = random.Random(0)
    marker = tok.encode("</think>", add_special_tokens=False)
    texts = [arith.sft_pairs(rng, 1, (1, 2, 3, 4))[0][1] for _ in range(32)]
    ids, mask = _batch(tok, [[t] for t in texts], prompt="3+4=")
    a = segment_episodes(ids, mask, ["</think>"], tokenizer=tok, max_episodes=3)
    b = segment_episodes(ids, mask, [marker], max_episodes=3)
    assert torch.equal(a, b) and (a.max(1).values >= 1).any()
