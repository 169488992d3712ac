// The output panel's tabs: Result, Code, History. A tab's content is drawn when it is shown, by the
// renderer registered for it (onTabShown), so this module depends on no pane.
import { $ } from "./state.js";

export const TABS = ["result", "code", "history"];
const renderers = {};

export function onTabShown(name, render) {
  renderers[name] = render;
}

export function selectTab(name) {
  for (const tab of TABS) {
    $(`tab-${tab}`).setAttribute("aria-selected", String(tab === name));
    $(`pane-${tab}`).hidden = tab !== name;
  }
  renderers[name]?.();
}
