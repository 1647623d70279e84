"""Gray release of a new model: shadow traffic, A/B by user, the evaluation set, promotion or rollback by rule."""
