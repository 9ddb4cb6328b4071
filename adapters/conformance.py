"""The conformance kit's TRAK and Captum checks (``selproj_plugin.testing`` finds them by entry point).

They live with the adapters so that the core never imports upward: pyproject.toml lists ``CHECKS``
under the ``selproj.checks`` entry-point group, and ``reducer_checks`` runs every check it finds
there after its own.  TRAK and Captum are imported inside each check, so a missing library fails
that check by name instead of hiding it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from typing import Any, Mapping

import numpy as np
import torch

from selproj_plugin.strategies.base import Reducer, reduction
from selproj_plugin.testing import QUERIES, TRAIN, assert_close, expected_cosines, instance, world


def check_trak(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """Inside TRAK (``traker_kwargs``) the cosines equal the transform's on the engine's gradients."""
    from trak import TRAKer

    from selproj_plugin.adapters.trak import encode, traker_kwargs

    w = world()
    reducer = instance(cls, options)
    with tempfile.TemporaryDirectory(prefix="selproj-check-") as save_dir:
        traker = TRAKer(train_set_size=len(TRAIN), save_dir=save_dir, logging_level=logging.ERROR, **traker_kwargs(w.model, reducer))
        traker.load_checkpoint(w.model.state_dict(), model_id=0)
        traker.featurize(batch=encode(w.tokenizer, TRAIN), num_samples=len(TRAIN))
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="check", checkpoint=w.model.state_dict(), model_id=0, num_targets=len(QUERIES))
        traker.score(batch=encode(w.tokenizer, QUERIES), num_samples=len(QUERIES))
        scores = np.asarray(traker.finalize_scores(exp_name="check"), dtype=np.float64).T
    assert_close(
        scores, expected_cosines(reduction(reducer, w.catalogue)), "TRAK's cosines differ from the transform's on the engine's gradients"
    )


def check_captum(cls: type[Reducer], options: Mapping[str, Any]) -> None:
    """Inside Captum (``ReducedTracInCP``) the cosines equal the transform's on the engine's gradients."""
    from selproj_plugin.adapters.captum import ReducedTracInCP, dataset, encode

    w = world()
    reducer = instance(cls, options)
    with tempfile.TemporaryDirectory(prefix="selproj-check-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that token ids take no gradient
        checkpoint = os.path.join(tmp, "model.pt")
        torch.save(w.model.state_dict(), checkpoint)
        tracin = ReducedTracInCP(w.model, dataset(w.tokenizer, TRAIN), [checkpoint], reducer, batch_size=2)
        scores = tracin.influence(encode(w.tokenizer, QUERIES)).detach().double().numpy()
    assert_close(
        scores, expected_cosines(reduction(reducer, w.catalogue)), "Captum's cosines differ from the transform's on the engine's gradients"
    )


CHECKS = (check_trak, check_captum)
