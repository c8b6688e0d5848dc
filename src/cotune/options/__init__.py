"""The machinery behind ``cotune.config``: option sections (``sections``) and how flags and YAML
files set them (``parse``). Verbs and users go through ``cotune.config``; see its docstring."""
