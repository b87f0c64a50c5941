"""Identity-preserving generation methods. Each submodule is one method; methods never import each other."""
