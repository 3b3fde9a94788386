-- Auto-routing rule for Orthanc as the hospital PACS: when a study stops changing, forward
-- the instances that came from the acquisition modality to the inference node.
-- The quickstart prepends the two settings below; edit them for a site.
--   ROUTE_FROM_AET = 'MODALITY'   -- calling AE title of the modality whose studies are analysed
--   ROUTE_TO = 'node'             -- name of the node in DicomModalities
-- Only instances sent by ROUTE_FROM_AET are forwarded: archived history, the node's own
-- reports and retrieved priors are never routed back to it.

function OnStableStudy(studyId, tags, metadata)
  local instances = ParseJson(RestApiGet('/studies/' .. studyId .. '/instances'))
  local selected = {}
  for _, instance in pairs(instances) do
    local meta = ParseJson(RestApiGet('/instances/' .. instance['ID'] .. '/metadata?expand'))
    if meta['RemoteAET'] == ROUTE_FROM_AET then
      table.insert(selected, instance['ID'])
    end
  end
  if #selected > 0 then
    print('routing ' .. #selected .. ' instance(s) of study ' .. studyId .. ' to ' .. ROUTE_TO)
    -- One association for the whole study; Orthanc retries are left to the sender's policy.
    RestApiPost('/modalities/' .. ROUTE_TO .. '/store', DumpJson({ Resources = selected, Synchronous = true }))
  end
end
