import matplotlib
import pytest

# Headless: every viz test draws on the Agg canvas, whatever the environment says.
matplotlib.use("Agg", force=True)


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")
