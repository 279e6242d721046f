"""dpdist."""
