"""Reading the residual stream out: the logit lens and tuned lens, fitting tuned lenses, direct logit
attribution through the final norm.
"""
