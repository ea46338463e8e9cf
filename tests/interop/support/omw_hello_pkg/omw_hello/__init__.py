"""omega|ml script package for the interop tests: run(om, *args, **kwargs) is what
omegaml.backends.package.tasks.run_omega_script (and run_omega_callback_script) calls."""
import os


def _plain(v):
    """A value as BSON can store it: arrays and tuples as lists, other objects as their repr."""
    if hasattr(v, 'tolist'):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return repr(v)


def run(om, *args, **kwargs):
    """Return what it was called with; with record=<name>, also store that as a dataset (so a test
    can see a callback ran); with fail=True, raise."""
    if kwargs.get('fail'):
        raise ValueError('omw_hello failed as asked')
    seen = {'args': [_plain(a) for a in args],
            'kwargs': {k: _plain(v) for k, v in sorted(kwargs.items())},
            'om_is_omega': type(om).__name__,
            'pid_differs': os.getpid() != int(kwargs.get('client_pid', 0))}
    if kwargs.get('record'):
        om.datasets.put(seen, kwargs['record'], append=False)
    return {'hello': 'from omw_hello', 'args': list(args), 'n_kwargs': len(kwargs)}
