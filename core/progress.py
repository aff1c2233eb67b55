"""The one progress bar: every loop that can take more than a few seconds (extraction, training epochs and
steps, SVM costs, detection iterations) shows its position, rate and time left on stderr."""
from tqdm import tqdm

FORMAT = "{desc}: {percentage:3.0f}% {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}"


def progress(iterable=None, desc="", total=None, unit="it", initial=0, show=True):
    """tqdm with the elapsed time and the ETA; `show=False` on processes other than rank 0."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, initial=initial, disable=not show, leave=False,
                dynamic_ncols=True, bar_format=FORMAT if total is not None or hasattr(iterable, "__len__") else None,
                mininterval=1.0)
