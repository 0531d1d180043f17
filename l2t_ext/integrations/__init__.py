"""Integrations with training libraries people already use (``l2t_ext.integrations.trl``)."""
