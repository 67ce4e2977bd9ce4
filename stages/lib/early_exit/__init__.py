"""Early exit: answers forced at prefixes of the reasoning, and stopping rules calibrated by Learn-then-Test."""
