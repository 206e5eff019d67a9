"""Bash completion generated from the argparse parsers, so it can never drift from them.

``kmsfs-admin completion bash`` and ``kmsfs completion bash`` print a script; source it, or
install it as /usr/share/bash-completion/completions/<command>. zsh users: ``autoload -U
bashcompinit && bashcompinit`` first.
"""

import argparse
import re

_SAFE = re.compile(r"[^A-Za-z0-9_]")


def _tree(
    parser: argparse.ArgumentParser, path: str, out: dict[str, tuple[list[str], list[str]]]
) -> None:
    options: list[str] = []
    commands: list[str] = []
    for action in parser._actions:
        options.extend(o for o in action.option_strings if o.startswith("--") or len(o) == 2)
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands.append(name)
                _tree(sub, f"{path} {name}".strip(), out)
    out[path] = (sorted(set(options)), commands)


def bash_script(parser: argparse.ArgumentParser, command: str) -> str:
    """A bash completion function for ``command`` covering every subcommand and option."""
    tree: dict[str, tuple[list[str], list[str]]] = {}
    _tree(parser, "", tree)
    fn = "_" + _SAFE.sub("_", command)
    cases = []
    for path, (options, commands) in sorted(tree.items()):
        opts, cmds = " ".join(options), " ".join(commands)
        cases.append(f'        "{path}") opts="{opts}"; cmds="{cmds}" ;;')
    return f"""# bash completion for {command} (generated: {command} completion bash)
{fn}() {{
    local cur path word opts cmds
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    path=""
    for word in "${{COMP_WORDS[@]:1:COMP_CWORD-1}}"; do
        case "$word" in -*) continue ;; esac
        case "$({fn}_has "$path" "$word")" in yes) path="${{path:+$path }}$word" ;; esac
    done
    {fn}_at "$path"
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
    elif [[ -n "$cmds" ]]; then
        COMPREPLY=( $(compgen -W "$cmds" -- "$cur") )
    else
        COMPREPLY=( $(compgen -f -- "$cur") )
    fi
}}
{fn}_at() {{
    case "$1" in
{chr(10).join(cases)}
        *) opts=""; cmds="" ;;
    esac
}}
{fn}_has() {{
    local opts cmds
    {fn}_at "$1"
    case " $cmds " in *" $2 "*) echo yes ;; *) echo no ;; esac
}}
complete -o filenames -F {fn} {command}
"""
