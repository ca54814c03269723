"""Conditional density estimation p(y | x) with normalizing flows on UCI data (``nfvi cde``).

- :mod:`nfvi.cde.data`: the DDN benchmark suite's UCI loaders (original file formats, download with
  checksums) and two synthetic sets with a known conditional density; splits and standardisation.
- :mod:`nfvi.cde.model`: ``FlowCDE`` (affine base + amortized flow, normalizing direction y -> z),
  ``MixtureDensityNetwork``; ``build_model``.
- :mod:`nfvi.cde.fit`: one seed's training with early stopping and its test NLL.
- :mod:`nfvi.cde.task`: the Hydra task (config schema ``base_cde``), loops over seeds, writes results.json.
"""
