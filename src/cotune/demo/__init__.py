"""The embedded default: a tiny Mllama built like a trained one (``tiny``), the bundled synthetic
LLaVA-CoT dataset (``synthetic``) and the recipe that fine-tunes one on the other (``demo.yaml``).

They ship inside the package, so ``cotune demo`` works from any directory after ``pip install``.
The ``cotune demo`` verb itself, which trains and evaluates, is ``cotune.run_demo``.
"""
