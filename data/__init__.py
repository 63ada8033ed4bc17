"""profuser.data: the shipped WordNet instruction corpus (wordnet_instruct.jsonl, see LICENSE-WordNet.txt)."""
