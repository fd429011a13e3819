"""Run configuration: :class:`~.eakd_config.EAKDConfig` and :class:`~.eakd_config.ConfigError` (:mod:`.eakd_config`),
recipe YAMLs with command-line overrides (:mod:`.recipe`), the generated configuration reference (:mod:`.reference`).
Imports only :mod:`eakd_llm.loss` (the allowed loss options).
"""
