"""Studies: paired statistics with crossed-design intervals (:mod:`.statistics`), the embedded demo's plan, runner and
report (:mod:`.demo_plan`, :mod:`.demo`, :mod:`.demo_report`), the real-model study's (:mod:`.real_study_plan`,
:mod:`.real_study`, :mod:`.real_study_report`) and the offline tiny stack (:mod:`.synthetic`).
"""
