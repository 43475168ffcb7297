"""The method x rank sweep: candidates, comparison and the winner."""
