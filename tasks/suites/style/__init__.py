"""The style suite: mix styles of a diffusion model by mixing unique parts (registered as
suite ``style``; ``tvsplit evaluate style --preset small`` runs it through the generic
suite flow).

Modules: ``suite`` (the registered ``StyleSuite``: pool, methods, choice rule, presets;
light), ``data`` (digits and style transforms), ``model`` (diffusers UNet, DDPM training,
DDIM sampling), ``classifiers`` (digit classifier and style detector), ``zoo`` (base,
fine-tunes, judges), ``evaluate`` (samples → Fréchet distances, confidence, strengths),
``report`` (tables, verdict, sample grid, section). Importing this package imports nothing
heavy.
"""
