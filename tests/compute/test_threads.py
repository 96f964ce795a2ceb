"""ComputeThreads: one core left to the store while it works, all of them back when it is idle."""
import torch

from moestream.compute.threads import ComputeThreads


def test_threads_drop_by_one_while_the_store_is_busy_and_come_back():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        ct = ComputeThreads()
        ct.adjust(store_busy=True)
        assert torch.get_num_threads() == 1
        ct.adjust(store_busy=False)
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)               # the user changed it: adopted as the full count
        ct.adjust(store_busy=True)
        assert torch.get_num_threads() == 2
        ct.adjust(store_busy=False)
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)               # one thread: nothing to give
        ct.adjust(store_busy=True)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
