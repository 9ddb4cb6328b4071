"""The loss's trained positions: every response token and EOS, whatever the prompt."""

from __future__ import annotations

import pytest

from selproj_plugin.loss import SampleError, collate, encode_sample
from selproj_plugin.samples import Sample
from tests import tiny


def test_empty_prompt_without_chat_template_or_added_bos_trains_every_response_token():
    tok = tiny.tokenizer(chat=False, bos=False)  # has a BOS token, but does not add it
    enc = encode_sample(tok, Sample("e", "", "abc"), 512)
    response = tok("abc", add_special_tokens=False)["input_ids"]
    assert len(response) == 3  # byte-level: one token a character
    assert enc.n_targets == 4  # "a", "b", "c", EOS
    assert collate([enc], pad_id=0).target_mask.sum() == 4
    assert enc.input_ids == (tok.bos_token_id, *response, tok.eos_token_id)


def test_empty_prompt_with_neither_bos_nor_chat_template_is_one_line():
    tok = tiny.tokenizer(chat=False, bos=False)
    tok.bos_token = None
    assert tok.bos_token_id is None
    with pytest.raises(SampleError) as err:
        encode_sample(tok, Sample("blank", "", "abc"), 512)
    assert str(err.value).startswith("sample blank: empty prompt") and "\n" not in str(err.value)
