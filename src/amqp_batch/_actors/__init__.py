"""The actors of one worker session: receiver -> batcher -> handler runner -> acker."""
