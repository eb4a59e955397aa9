"""ayt: consistency training with manifold feature distances (Align Your Tangent).

Pipeline layout: data -> networks -> method (schedule, losses, feature map) ->
training (single process, then Ray Train) -> studies (Ray Tune + MLflow).
"""

__version__ = "0.1.0"
