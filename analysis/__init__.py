"""Deviation analysis: the detector that scores samples against the expected-usage model
(used live by the monitor-consumer), each order's context, rescoring and deviation plots."""
